//! Verification of the audit trail's chains, a pure function of the records in the order they
//! were appended: records are grouped by `chain_id`, and each chain must run from `seq` 0 up by
//! one, each record naming the sha256 of the one before (`prev_sha256`), and its first record
//! may name the last confirmed record of the worker's chain before it (`previous_chain`). A
//! removed record leaves a gap, an altered one a digest its successor does not name, reordered
//! ones a `seq` that goes down. docs/AUDIT.md describes the chain.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::record::{digest, ChainLink, Fields, PreviousChain};

/// Records of a chain whose digests are kept, to check records that come out of order and the
/// `previous_chain` of the next chain: the most recent ones by `seq`.
const KEPT: usize = 1024;
/// A chain without a record among the last this many keeps only [`KEPT_IDLE`] digests: its
/// session has most likely ended, and a stream holds many such chains.
const IDLE_AFTER: u64 = 100_000;
const KEPT_IDLE: usize = 16;

/// What breaks a chain, or a record outside any chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Not a JSON object: no chain can be told.
    Unreadable { offset: u64, reason: String },
    /// A JSON object without the members that place it in a chain.
    NotChained { offset: u64, lacking: Vec<&'static str> },
    /// `seq` `from` to `to` are not in the stream.
    Gap { from: u64, to: u64 },
    /// `seq` came after the higher `after`.
    Reordered { seq: u64, after: u64 },
    /// `seq` came a second time.
    Repeated { seq: u64 },
    /// `prev_sha256` of `next` is not the sha256 of `seq` as stored: one of them was altered.
    DigestMismatch { seq: u64, next: u64 },
    /// The chain's first record seen is not `seq` 0, and the window was not cut.
    StartsLate { seq: u64 },
    /// `seq` 0 names a previous record, or a later record names none.
    BadPrev { seq: u64 },
    /// The record names another worker than the chain's first record.
    OtherWorker { seq: u64, worker_id: String },
    /// `previous_chain` that is not `null` nor a link, or on a record other than `seq` 0.
    BadLink { seq: u64 },
    /// `previous_chain` names a chain the stream does not hold.
    LinkToMissingChain { chain_id: String },
    /// `previous_chain` names a record the stream does not hold, or one with another digest.
    LinkMismatch { chain_id: String, seq: u64 },
    /// `previous_chain` names another worker's chain.
    LinkToOtherWorker { chain_id: String, worker_id: String },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable { offset, reason } => write!(f, "record at offset {offset} is unreadable: {reason}"),
            Problem::NotChained { offset, lacking } => {
                write!(f, "record at offset {offset} lacks chain members: {}", lacking.join(", "))
            }
            Problem::Gap { from, to } if from == to => write!(f, "gap: seq {from} missing"),
            Problem::Gap { from, to } => write!(f, "gap: seq {from}-{to} missing ({} records)", to - from + 1),
            Problem::Reordered { seq, after } => write!(f, "reordered: seq {seq} came after seq {after}"),
            Problem::Repeated { seq } => write!(f, "repeated: seq {seq} appears again"),
            Problem::DigestMismatch { seq, next } => write!(
                f,
                "digest mismatch: prev_sha256 of seq {next} is not the sha256 of seq {seq} (seq {seq} or seq {next} \
                 altered)"
            ),
            Problem::StartsLate { seq } => write!(f, "starts at seq {seq}, not 0: its first records are missing"),
            Problem::BadPrev { seq: 0 } => write!(f, "seq 0 names a previous record"),
            Problem::BadPrev { seq } => write!(f, "seq {seq} names no previous record"),
            Problem::OtherWorker { seq, worker_id } => write!(f, "seq {seq} names another worker, {worker_id}"),
            Problem::BadLink { seq } => write!(f, "seq {seq} has a previous_chain it should not have"),
            Problem::LinkToMissingChain { chain_id } => {
                write!(f, "previous_chain names chain {chain_id}, which the stream does not hold")
            }
            Problem::LinkMismatch { chain_id, seq } => write!(
                f,
                "previous_chain names seq {seq} of chain {chain_id} with a sha256 the stream's record does not have"
            ),
            Problem::LinkToOtherWorker { chain_id, worker_id } => {
                write!(f, "previous_chain names chain {chain_id} of another worker, {worker_id}")
            }
        }
    }
}

/// What verification found about one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    pub worker_id: String,
    pub chain_id: String,
    /// The lowest and highest `seq` seen.
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub problems: Vec<Problem>,
    /// What is not a problem but worth saying (records a failed session never stored).
    pub notes: Vec<String>,
}

/// The outcome of verifying every chain of a part of the trail.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// In the order each chain's first record was seen.
    pub chains: Vec<ChainReport>,
    /// Records that belong to no chain.
    pub outside: Vec<Problem>,
    pub records: u64,
}

impl Report {
    pub fn problems(&self) -> usize {
        self.outside.len() + self.chains.iter().map(|c| c.problems.len()).sum::<usize>()
    }

    /// No problem in any chain nor outside one.
    pub fn is_whole(&self) -> bool {
        self.problems() == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chain in &self.chains {
            let verdict = if chain.problems.is_empty() {
                "OK".to_string()
            } else {
                let shown: Vec<String> = chain.problems.iter().map(Problem::to_string).collect();
                format!("BROKEN: {}", shown.join("; "))
            };
            write!(
                f,
                "{} {} seq {}-{} {} records {verdict}",
                chain.worker_id, chain.chain_id, chain.first_seq, chain.last_seq, chain.records
            )?;
            for note in &chain.notes {
                write!(f, " (note: {note})")?;
            }
            writeln!(f)?;
        }
        for problem in &self.outside {
            writeln!(f, "outside any chain: {problem}")?;
        }
        let broken = self.chains.iter().filter(|c| !c.problems.is_empty()).count();
        let problems = self.problems();
        write!(f, "total: {} chains, {} records: ", self.chains.len(), self.records)?;
        if problems == 0 {
            writeln!(f, "all chains whole")
        } else {
            writeln!(f, "{problems} problems, {broken} chains broken, {} records outside any chain", self.outside.len())
        }
    }
}

/// A record's digest and the digest it names.
struct Seen {
    digest: String,
    prev: Option<String>,
}

/// What is known of one chain so far.
struct ChainState {
    report: ChainReport,
    /// Digests of the most recent records, by `seq`.
    recent: BTreeMap<u64, Seen>,
    /// `seq` ranges above the first and below the highest seen that have not come (yet).
    missing: Vec<(u64, u64)>,
    /// The last record the broker confirmed, as the next chain's `previous_chain` names it.
    confirmed_end: Option<u64>,
    /// Where its last record came, counting every record.
    last_position: u64,
}

/// Verifies chains one record at a time; [`verify`] runs it over a list.
pub struct Verifier {
    /// The part of the trail read does not start at its beginning: a chain may start before it.
    window_cut: bool,
    chains: Vec<ChainState>,
    by_id: HashMap<String, usize>,
    outside: Vec<Problem>,
    records: u64,
}

/// Verifies the chains of `records`, `(stream offset, bytes as stored)` in stream order.
/// `window_cut`: the records do not start at the trail's beginning, so a chain's first record
/// seen counts as its start.
pub fn verify<'a>(records: impl IntoIterator<Item = (u64, &'a [u8])>, window_cut: bool) -> Report {
    let mut verifier = Verifier::new(window_cut);
    for (offset, bytes) in records {
        verifier.push(offset, bytes);
    }
    verifier.finish()
}

impl Verifier {
    pub fn new(window_cut: bool) -> Self {
        Verifier { window_cut, chains: Vec::new(), by_id: HashMap::new(), outside: Vec::new(), records: 0 }
    }

    /// The next record in stream order.
    pub fn push(&mut self, offset: u64, bytes: &[u8]) {
        self.records += 1;
        if self.records.is_multiple_of(IDLE_AFTER) {
            self.forget_idle();
        }
        let fields = match Fields::read(bytes) {
            Ok(fields) => fields,
            Err(reason) => return self.outside.push(Problem::Unreadable { offset, reason }),
        };
        let lacking: Vec<&'static str> = [
            ("worker_id", fields.worker_id.is_none()),
            ("chain_id", fields.chain_id.is_none()),
            ("seq", fields.seq.is_none()),
            ("prev_sha256", fields.prev_sha256.is_none()),
        ]
        .into_iter()
        .filter_map(|(name, absent)| absent.then_some(name))
        .collect();
        let (Some(worker_id), Some(chain_id), Some(seq), Some(prev)) =
            (&fields.worker_id, &fields.chain_id, fields.seq, &fields.prev_sha256)
        else {
            let problem = Problem::NotChained { offset, lacking };
            match fields.chain_id.as_ref().and_then(|id| self.by_id.get(id)) {
                Some(&index) => self.chains[index].report.problems.push(problem),
                None => self.outside.push(problem),
            }
            return;
        };
        let index = self.chain(worker_id, chain_id, seq);
        self.place(index, worker_id, seq);
        let seen = Seen { digest: digest(bytes), prev: prev.clone() };
        self.check_digests(index, seq, &seen);
        self.check_link(index, seq, &fields.previous_chain);
        let chain = &mut self.chains[index];
        chain.last_position = self.records;
        chain.recent.entry(seq).or_insert(seen);
        while chain.recent.len() > KEPT {
            chain.recent.pop_first();
        }
    }

    /// The chain `chain_id`, started when first seen.
    fn chain(&mut self, worker_id: &str, chain_id: &str, seq: u64) -> usize {
        if let Some(&index) = self.by_id.get(chain_id) {
            return index;
        }
        let mut problems = Vec::new();
        if seq != 0 && !self.window_cut {
            problems.push(Problem::StartsLate { seq });
        }
        self.chains.push(ChainState {
            report: ChainReport {
                worker_id: worker_id.to_string(),
                chain_id: chain_id.to_string(),
                first_seq: seq,
                last_seq: seq,
                records: 0,
                problems,
                notes: Vec::new(),
            },
            recent: BTreeMap::new(),
            missing: Vec::new(),
            confirmed_end: None,
            last_position: self.records,
        });
        self.by_id.insert(chain_id.to_string(), self.chains.len() - 1);
        self.chains.len() - 1
    }

    /// Places `seq` in its chain's order: a gap, the next, or one that came late or again.
    fn place(&mut self, index: usize, worker_id: &str, seq: u64) {
        let chain = &mut self.chains[index];
        let report = &mut chain.report;
        if report.records > 0 {
            if report.worker_id != worker_id {
                report.problems.push(Problem::OtherWorker { seq, worker_id: worker_id.to_string() });
            }
            if seq > report.last_seq + 1 {
                chain.missing.push((report.last_seq + 1, seq - 1));
            }
            if seq > report.last_seq {
                report.last_seq = seq;
            } else if fill(&mut chain.missing, seq) {
                report.problems.push(Problem::Reordered { seq, after: report.last_seq });
            } else if seq < report.first_seq && self.window_cut {
                // Before the first seen of a chain cut by the window: late, not repeated.
                report.problems.push(Problem::Reordered { seq, after: report.last_seq });
                report.first_seq = seq;
            } else {
                report.problems.push(Problem::Repeated { seq });
            }
        }
        report.records += 1;
    }

    /// Checks that `seq` names the digest of the record before it, and, when the record after it
    /// came first, that that one names this one's.
    fn check_digests(&mut self, index: usize, seq: u64, seen: &Seen) {
        let chain = &mut self.chains[index];
        let problems = &mut chain.report.problems;
        if (seq == 0) == seen.prev.is_some() {
            problems.push(Problem::BadPrev { seq });
        }
        if let (Some(before), Some(prev)) = (seq.checked_sub(1).and_then(|s| chain.recent.get(&s)), &seen.prev) {
            if *prev != before.digest {
                problems.push(Problem::DigestMismatch { seq: seq - 1, next: seq });
            }
        }
        if let Some(after) = chain.recent.get(&(seq + 1)) {
            if after.prev.as_deref() != Some(seen.digest.as_str()) {
                problems.push(Problem::DigestMismatch { seq, next: seq + 1 });
            }
        }
    }

    /// Checks a chain's `previous_chain`: only on `seq` 0, naming a record of this worker's
    /// earlier chain with that record's digest.
    fn check_link(&mut self, index: usize, seq: u64, link: &PreviousChain) {
        let link = match (seq, link) {
            (_, PreviousChain::Absent | PreviousChain::Unknown) => return,
            (0, PreviousChain::Link(link)) => link,
            _ => return self.chains[index].report.problems.push(Problem::BadLink { seq }),
        };
        let problem = self.linked_problem(index, link);
        self.chains[index].report.problems.extend(problem);
    }

    fn linked_problem(&mut self, index: usize, link: &ChainLink) -> Option<Problem> {
        let ChainLink { chain_id, seq, sha256 } = link;
        let worker_id = self.chains[index].report.worker_id.clone();
        let Some(&named) = self.by_id.get(chain_id) else {
            return (!self.window_cut).then(|| Problem::LinkToMissingChain { chain_id: chain_id.clone() });
        };
        let previous = &mut self.chains[named];
        previous.confirmed_end = Some(*seq);
        if previous.report.worker_id != worker_id {
            let worker_id = previous.report.worker_id.clone();
            return Some(Problem::LinkToOtherWorker { chain_id: chain_id.clone(), worker_id });
        }
        match previous.recent.get(seq) {
            Some(seen) if seen.digest == *sha256 => None,
            Some(_) => Some(Problem::LinkMismatch { chain_id: chain_id.clone(), seq: *seq }),
            None if *seq > previous.report.last_seq || previous.missing.iter().any(|&(a, b)| (a..=b).contains(seq)) => {
                Some(Problem::LinkMismatch { chain_id: chain_id.clone(), seq: *seq })
            }
            // Its digest is no longer kept: the record is there, its digest cannot be checked.
            None => None,
        }
    }

    /// Keeps few digests of chains without a recent record.
    fn forget_idle(&mut self) {
        for chain in &mut self.chains {
            if self.records - chain.last_position >= IDLE_AFTER {
                while chain.recent.len() > KEPT_IDLE {
                    chain.recent.pop_first();
                }
            }
        }
    }

    /// The report: every chain's gaps are known now. A gap after the last record the broker
    /// confirmed, as the next chain names it, is records a failed session never stored.
    pub fn finish(self) -> Report {
        let chains = self
            .chains
            .into_iter()
            .map(|mut chain| {
                for &(from, to) in &chain.missing {
                    match chain.confirmed_end {
                        Some(end) if from > end => chain.report.notes.push(format!(
                            "seq {from}-{to} never stored: published after seq {end}, the last the broker confirmed \
                             before the session ended"
                        )),
                        _ => chain.report.problems.push(Problem::Gap { from, to }),
                    }
                }
                chain.report
            })
            .collect();
        Report { chains, outside: self.outside, records: self.records }
    }
}

/// Removes `seq` from the missing ranges; whether it was missing.
fn fill(missing: &mut Vec<(u64, u64)>, seq: u64) -> bool {
    let Some(at) = missing.iter().position(|&(from, to)| (from..=to).contains(&seq)) else {
        return false;
    };
    let (from, to) = missing.remove(at);
    if seq < to {
        missing.insert(at, (seq + 1, to));
    }
    if from < seq {
        missing.insert(at, (from, seq - 1));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `n` records of one chain, each naming the digest of the one before, as a worker writes them.
    fn chain(worker: &str, chain_id: &str, n: u64, link: Option<serde_json::Value>) -> Vec<Vec<u8>> {
        let mut records = Vec::new();
        let mut prev: Option<String> = None;
        for seq in 0..n {
            let mut record = json!({
                "worker_id": worker, "chain_id": chain_id, "seq": seq, "prev_sha256": prev,
                "job_id": format!("{chain_id}-{seq}"), "status": "ok", "scored_ms": 1_000 + seq,
            });
            if let Some(link) = &link {
                record["previous_chain"] = if seq == 0 { link.clone() } else { serde_json::Value::Null };
            }
            let bytes = serde_json::to_vec(&record).expect("JSON");
            prev = Some(digest(&bytes));
            records.push(bytes);
        }
        records
    }

    fn check(records: &[Vec<u8>], window_cut: bool) -> Report {
        verify(records.iter().enumerate().map(|(offset, bytes)| (offset as u64, bytes.as_slice())), window_cut)
    }

    fn problems(report: &Report) -> Vec<Problem> {
        report.chains.iter().flat_map(|c| c.problems.clone()).chain(report.outside.clone()).collect()
    }

    /// Two chains of two workers, interleaved as a stream holds them.
    fn interleaved() -> Vec<Vec<u8>> {
        let (a, b) = (chain("w-a", "chain-a", 30, None), chain("w-b", "chain-b", 20, None));
        let mut records = Vec::new();
        let (mut a, mut b) = (a.into_iter(), b.into_iter());
        loop {
            match (a.next(), b.next()) {
                (None, None) => return records,
                (x, y) => records.extend(x.into_iter().chain(y)),
            }
        }
    }

    #[test]
    fn honest_chains_pass() {
        let report = check(&interleaved(), false);
        assert!(report.is_whole(), "{report}");
        assert_eq!(report.chains.len(), 2);
        assert_eq!((report.chains[0].first_seq, report.chains[0].last_seq, report.chains[0].records), (0, 29, 30));
        assert_eq!(report.records, 50);
        assert!(report.to_string().ends_with("total: 2 chains, 50 records: all chains whole\n"), "{report}");
    }

    #[test]
    fn a_removed_record_is_a_gap() {
        let mut records = chain("w", "c", 10, None);
        records.remove(4);
        let report = check(&records, false);
        assert_eq!(problems(&report), vec![Problem::Gap { from: 4, to: 4 }], "{report}");
        assert!(report.to_string().contains("gap: seq 4 missing"), "{report}");
    }

    #[test]
    fn an_altered_record_is_a_digest_mismatch_naming_its_seq() {
        let mut records = chain("w", "c", 10, None);
        records[6] = String::from_utf8(records[6].clone()).expect("UTF-8").replace("\"ok\"", "\"error\"").into_bytes();
        let report = check(&records, false);
        assert_eq!(problems(&report), vec![Problem::DigestMismatch { seq: 6, next: 7 }], "{report}");
        assert!(report.to_string().contains("not the sha256 of seq 6"), "{report}");
    }

    #[test]
    fn reordered_records_are_reported() {
        let mut records = chain("w", "c", 10, None);
        records.swap(3, 5);
        let report = check(&records, false);
        let found = problems(&report);
        assert!(found.contains(&Problem::Reordered { seq: 3, after: 5 }), "{report}");
        assert!(!found.iter().any(|p| matches!(p, Problem::Gap { .. })), "late records fill their gap: {report}");
        assert!(!report.is_whole());
    }

    #[test]
    fn a_repeated_record_is_reported() {
        let mut records = chain("w", "c", 5, None);
        records.push(records[2].clone());
        assert_eq!(problems(&check(&records, false)), vec![Problem::Repeated { seq: 2 }]);
    }

    #[test]
    fn a_chain_must_start_at_zero_unless_the_window_was_cut() {
        let records = chain("w", "c", 10, None).split_off(3);
        assert_eq!(problems(&check(&records, false)), vec![Problem::StartsLate { seq: 3 }]);
        assert!(check(&records, true).is_whole());
    }

    #[test]
    fn records_outside_a_chain_are_reported() {
        let mut records = chain("w", "c", 3, None);
        records.push(b"{not json".to_vec());
        records.push(br#"{"chain_id":"c","seq":3}"#.to_vec());
        records.push(br#"{"job_id":"x"}"#.to_vec());
        let report = check(&records, false);
        let found = problems(&report);
        assert!(
            matches!(&found[0], Problem::NotChained { offset: 4, lacking } if lacking == &["worker_id", "prev_sha256"])
        );
        assert!(matches!(&found[1], Problem::Unreadable { offset: 3, .. }), "{report}");
        assert!(matches!(&found[2], Problem::NotChained { offset: 5, .. }), "{report}");
        assert_eq!(report.chains[0].problems.len(), 1, "a record of a known chain counts for it");
    }

    #[test]
    fn a_previous_chain_link_is_checked_and_excuses_what_was_never_confirmed() {
        let mut first = chain("w", "one", 6, Some(serde_json::Value::Null));
        // The session failed: seq 4 never reached the stream; seq 3 was the last confirmed.
        first.remove(4);
        let link = json!({"chain_id": "one", "seq": 3, "sha256": digest(&first[3])});
        let second = chain("w", "two", 3, Some(link));
        let records: Vec<Vec<u8>> = first.iter().chain(&second).cloned().collect();
        let report = check(&records, false);
        assert!(report.is_whole(), "{report}");
        assert!(report.chains[0].notes[0].contains("seq 4-4 never stored"), "{report}");

        let wrong = json!({"chain_id": "one", "seq": 3, "sha256": digest(b"something else")});
        let records: Vec<Vec<u8>> = first.iter().chain(&chain("w", "two", 2, Some(wrong))).cloned().collect();
        let found = problems(&check(&records, false));
        assert!(found.contains(&Problem::LinkMismatch { chain_id: "one".into(), seq: 3 }), "{found:?}");

        let elsewhere = json!({"chain_id": "gone", "seq": 9, "sha256": digest(b"x")});
        let records = chain("w", "two", 2, Some(elsewhere));
        assert_eq!(problems(&check(&records, false)), vec![Problem::LinkToMissingChain { chain_id: "gone".into() }]);
        assert!(check(&records, true).is_whole(), "a cut window may not hold the previous chain");
    }

    #[test]
    fn missing_ranges_split_as_late_records_fill_them() {
        let mut missing = vec![(3, 7)];
        assert!(fill(&mut missing, 5));
        assert_eq!(missing, vec![(3, 4), (6, 7)]);
        assert!(fill(&mut missing, 3) && fill(&mut missing, 7) && !fill(&mut missing, 5));
        assert_eq!(missing, vec![(4, 4), (6, 6)]);
    }
}
