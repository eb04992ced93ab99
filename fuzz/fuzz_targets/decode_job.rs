//! Fuzz target for job decoding: arbitrary bodies and message properties must never panic, and
//! whatever decodes must satisfy the guarantees later stages rely on.
//!
//! Input layout: one header byte, then the body. Header bit 0 asks for a message_id, bits 1–2
//! pick the content_type (none, JSON, JSON with parameters, or free text), bits 3–7 give the
//! length of free-text properties, which are cut from the end of the body. A JSON body behind a
//! zero byte is therefore decoded as sent, so seeds and dictionaries stay plain JSON.

#![no_main]

use batchscore::job::{decode, Envelope, Features, MAX_JOB_ID_CHARS};
use batchscore::settings::LimitSettings;
use libfuzzer_sys::fuzz_target;

const LIMITS: LimitSettings =
    LimitSettings { max_rows_per_job: 1000, max_job_bytes: 1 << 20, max_inflight_rows: 100_000 };

fuzz_target!(|data: &[u8]| {
    let (message_id, content_type, body) = envelope_parts(data);
    let envelope = Envelope { body, message_id, content_type, model_header: None };
    match decode(envelope, &LIMITS) {
        Ok(job) => {
            let rows = job.features.row_count();
            assert!((1..=LIMITS.max_rows_per_job).contains(&rows), "decoded {rows} rows");
            assert!(body.len() <= LIMITS.max_job_bytes, "decoded a body of {} bytes", body.len());
            let id_chars = job.job_id.chars().count();
            assert!((1..=MAX_JOB_ID_CHARS).contains(&id_chars), "job_id of {id_chars} characters");
            match &job.features {
                Features::Rows { values, widths } => {
                    assert_eq!(values.len(), widths.iter().sum::<usize>(), "row widths do not add up to the values");
                    assert!(values.iter().all(|v| v.is_finite()), "non-finite value in rows: {values:?}");
                }
                Features::Records(records) => {
                    let finite = records.iter().flatten().all(|(_, v)| v.is_finite());
                    assert!(finite, "non-finite value in records: {records:?}");
                }
                Features::Tensors(tensors) => {
                    for tensor in tensors {
                        let capacity: usize = tensor.shape.iter().product();
                        assert_eq!(capacity, tensor.values.len(), "shape {:?} does not match the values", tensor.shape);
                        assert_eq!(tensor.rows(), rows, "tensor {} disagrees on rows", tensor.name);
                        assert!(tensor.values.iter().all(|v| v.is_finite()), "non-finite value in {}", tensor.name);
                    }
                }
            }
        }
        // Every rejection is reported to the job's sender, so it must say something.
        Err(error) => assert!(!error.reason.message().is_empty(), "empty message for {:?}", error.reason.code()),
    }
});

fn envelope_parts(data: &[u8]) -> (Option<&str>, Option<&str>, &[u8]) {
    let Some((&header, mut body)) = data.split_first() else {
        return (None, None, data);
    };
    let free_text_len = usize::from(header >> 3);
    let message_id = (header & 1 == 1).then(|| cut_from_end(&mut body, free_text_len));
    let content_type = match (header >> 1) & 3 {
        0 => None,
        1 => Some("application/json"),
        // Parameters and letter case are legal in a media type and must be accepted.
        2 => Some("Application/JSON; charset=utf-8"),
        _ => Some(cut_from_end(&mut body, free_text_len)),
    };
    (message_id, content_type, body)
}

fn cut_from_end<'a>(body: &mut &'a [u8], len: usize) -> &'a str {
    let (rest, tail) = body.split_at(body.len() - len.min(body.len()));
    *body = rest;
    utf8_prefix(tail)
}

/// AMQP short strings are UTF-8 by the time they reach decoding; invalid tails are dropped.
fn utf8_prefix(bytes: &[u8]) -> &str {
    match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => std::str::from_utf8(&bytes[..error.valid_up_to()]).unwrap_or_default(),
    }
}
