//! Payload encryption: the keys of `security.payload_keys` (and of `submit --key-file`), and the
//! sealing and opening of message bodies with AES-256-GCM. It owns the key files' format, the
//! body layout (`nonce ‖ ciphertext ‖ tag`), the header values that mark a sealed body, and the
//! rule of `security.require_encryption`; it knows no transport and no other module of the
//! crate. The consumer hands it a job's headers as plain values and gets the plaintext back (or
//! why the body cannot be read); the publisher seals a result with the key its job came with.
//!
//! Each key's cipher (its AES key schedule) is built once, when the key is read at start-up, and
//! shared by every message; key bytes never appear in `Debug` output, errors or logs, and are
//! wiped from memory when the last holder drops them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::aead::{AeadInOut, Generate, KeyInit};
use aes_gcm::{Aes256Gcm, Tag};
use base64::Engine as _;
use zeroize::Zeroizing;

/// Header naming a sealed body's scheme; its only value is [`SCHEME`].
pub const ENCRYPTION_HEADER: &str = "x-encryption";
/// Header naming the key a body is sealed with.
pub const KEY_ID_HEADER: &str = "x-key-id";
/// The one scheme: AES-256-GCM, 96-bit random nonce, 128-bit tag, no associated data.
pub const SCHEME: &str = "aes-256-gcm";
pub const KEY_BYTES: usize = 32;
pub const NONCE_BYTES: usize = 12;
pub const TAG_BYTES: usize = 16;
/// What sealing adds to a body: the nonce before it, the tag after it.
pub const OVERHEAD_BYTES: usize = NONCE_BYTES + TAG_BYTES;
/// Longest key id. Ids are 1 to this many characters of `a-z`, `0-9`, `.`, `_` and `-`: they
/// travel in a header and in logs, and lower case only, because environment overrides
/// (`BATCHSCORE__SECURITY__PAYLOAD_KEYS__<ID>`) reach the worker in lower case.
pub const MAX_KEY_ID_CHARS: usize = 64;

const KEY_FILE_FIX: &str = "the file must hold a 256-bit key: 32 random bytes (openssl rand -out FILE 32), 64 hex \
     digits (openssl rand -hex 32) or the base64 of 32 bytes (openssl rand -base64 32)";

/// A key that cannot be used, found at start-up. The message names where the key was set, the
/// file and the fix, never the file's content.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{origin}: key id {id:?} must be 1 to {MAX_KEY_ID_CHARS} characters of a-z, 0-9, '.', '_' and '-' \
         (it travels in the {KEY_ID_HEADER} header)"
    )]
    BadId { origin: String, id: String },
    #[error("{origin}: cannot read {}: {source}; mount the key there, or remove {origin}", path.display())]
    Unreadable {
        origin: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {} {problem}; {KEY_FILE_FIX}", path.display())]
    Malformed { origin: String, path: PathBuf, problem: String },
}

/// One AES-256-GCM key and its id, cheap to clone: every clone shares one cipher.
#[derive(Clone)]
pub struct PayloadKey(Arc<KeyInner>);

struct KeyInner {
    id: String,
    cipher: Aes256Gcm,
}

/// Shows the id only.
impl fmt::Debug for PayloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayloadKey").field("id", &self.0.id).finish_non_exhaustive()
    }
}

impl PayloadKey {
    /// The key `bytes` under `id`; `origin` names the setting or option, for the error.
    pub fn new(origin: &str, id: &str, bytes: &[u8; KEY_BYTES]) -> Result<Self, KeyError> {
        if !valid_key_id(id) {
            return Err(KeyError::BadId { origin: origin.to_string(), id: id.to_string() });
        }
        let cipher = Aes256Gcm::new_from_slice(bytes).expect("an AES-256 key has 32 bytes");
        Ok(Self(Arc::new(KeyInner { id: id.to_string(), cipher })))
    }

    /// The key in the file at `path` (see [`parse_key`] for the forms it may take).
    pub fn load(origin: &str, id: &str, path: &Path) -> Result<Self, KeyError> {
        if !valid_key_id(id) {
            return Err(KeyError::BadId { origin: origin.to_string(), id: id.to_string() });
        }
        let content = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Unreadable {
            origin: origin.to_string(),
            path: path.to_path_buf(),
            source,
        })?);
        let bytes = parse_key(&content).map_err(|problem| KeyError::Malformed {
            origin: origin.to_string(),
            path: path.to_path_buf(),
            problem,
        })?;
        Self::new(origin, id, &bytes)
    }

    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// `plaintext` sealed under a fresh random nonce: `nonce ‖ ciphertext ‖ tag`.
    ///
    /// # Panics
    /// When the operating system's random source fails, which on Linux it does not once the
    /// kernel has seeded it (the worker cannot run before that). Reusing a nonce would break
    /// GCM, so there is no fallback.
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let nonce = <[u8; NONCE_BYTES]>::try_generate().expect("the operating system's random source works");
        self.seal_with_nonce(nonce, plaintext)
    }

    /// `plaintext` sealed under `nonce`, which must never have sealed anything under this key
    /// before: for known-answer tests; [`PayloadKey::seal`] picks a random one.
    pub fn seal_with_nonce(&self, nonce: [u8; NONCE_BYTES], plaintext: &[u8]) -> Vec<u8> {
        let mut sealed = Vec::with_capacity(OVERHEAD_BYTES + plaintext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plaintext);
        let tag = self
            .0
            .cipher
            .encrypt_inout_detached(&nonce.into(), b"", (&mut sealed[NONCE_BYTES..]).into())
            // Only a plaintext beyond 64 GiB fails; no message comes near.
            .expect("a message body is within AES-GCM's length limit");
        sealed.extend_from_slice(&tag);
        sealed
    }

    /// The plaintext of a sealed body, or `None` when it is too short or does not authenticate
    /// under this key (altered, or sealed with another key).
    pub fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < OVERHEAD_BYTES {
            return None;
        }
        let (nonce, rest) = sealed.split_at(NONCE_BYTES);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().ok()?;
        let tag = Tag::try_from(tag).ok()?;
        let mut plaintext = ciphertext.to_vec();
        self.0.cipher.decrypt_inout_detached(&nonce.into(), b"", plaintext.as_mut_slice().into(), &tag).ok()?;
        Some(plaintext)
    }
}

/// Whether `id` may name a key: see [`MAX_KEY_ID_CHARS`].
pub fn valid_key_id(id: &str) -> bool {
    (1..=MAX_KEY_ID_CHARS).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
}

/// A key file's 32 key bytes. The file holds them raw (exactly 32 bytes, not all printable
/// text), or as text: 64 hex digits, or base64 (standard alphabet, padded or not) of 32 bytes,
/// with any whitespace around. 32 printable characters are read as text, so that the hex of a
/// 128-bit key or the base64 of a 192-bit one is refused rather than taken for raw bytes.
pub fn parse_key(content: &[u8]) -> Result<Zeroizing<[u8; KEY_BYTES]>, String> {
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    let text_like = content.iter().all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    if content.len() == KEY_BYTES && !text_like {
        key.copy_from_slice(content);
        return Ok(key);
    }
    if content.is_empty() {
        return Err("is empty".into());
    }
    if !text_like {
        return Err(format!("holds {} bytes that are not text; a raw key has exactly {KEY_BYTES}", content.len()));
    }
    let text = content.trim_ascii();
    if text.len() == 2 * KEY_BYTES && text.iter().all(u8::is_ascii_hexdigit) {
        for (byte, pair) in key.iter_mut().zip(text.chunks_exact(2)) {
            *byte = (hex_value(pair[0]) << 4) | hex_value(pair[1]);
        }
        return Ok(key);
    }
    let decoded = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
            .ok(),
    );
    match decoded.as_deref() {
        Some(bytes) if bytes.len() == KEY_BYTES => {
            key.copy_from_slice(bytes);
            Ok(key)
        }
        // Hex digits are base64 characters too: a key of the wrong length in hex is told as hex.
        _ if text.iter().all(u8::is_ascii_hexdigit) => Err(format!(
            "holds {} hex digits ({} bits); a key has {} (256 bits)",
            text.len(),
            text.len() * 4,
            2 * KEY_BYTES
        )),
        Some(bytes) => Err(format!(
            "holds base64 of {} bytes ({} bits); a key has {KEY_BYTES} bytes (256 bits)",
            bytes.len(),
            bytes.len() * 8
        )),
        None => Err(format!("holds {} characters that are neither hex nor base64", text.len())),
    }
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit.to_ascii_lowercase() - b'a' + 10,
    }
}

/// A job's encryption headers, as the transport read them: present when the message has
/// `x-encryption`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealing<'a> {
    /// The `x-encryption` value (a string, or `None` when it is not one).
    pub scheme: Option<&'a str>,
    /// The `x-key-id` value, when present and a string.
    pub key_id: Option<&'a str>,
}

/// A job body as the pipeline reads it.
#[derive(Debug)]
pub enum Opened<'a> {
    /// The job came in plaintext.
    Plain(&'a [u8]),
    /// The job came sealed: its plaintext, and the key that opened it, which seals its result.
    Sealed { plaintext: Vec<u8>, key: PayloadKey },
}

impl Opened<'_> {
    pub fn body(&self) -> &[u8] {
        match self {
            Opened::Plain(body) => body,
            Opened::Sealed { plaintext, .. } => plaintext,
        }
    }

    /// The key the job's result must be sealed with, if any.
    pub fn key(&self) -> Option<&PayloadKey> {
        match self {
            Opened::Plain(_) => None,
            Opened::Sealed { key, .. } => Some(key),
        }
    }
}

/// Why a job's body cannot be read. [`Refusal`]'s `Display` is what the publisher is told: one
/// message for an unknown key and a body that does not authenticate, so an answer says nothing
/// about which key ids exist. [`Refusal::cause`] tells the two apart for the worker's own log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `x-encryption` names another scheme (or is not a string).
    Scheme(Option<String>),
    /// `x-encryption` without an `x-key-id` string.
    NoKeyId,
    /// No key of that id.
    UnknownKey(String),
    /// The body does not authenticate under the key of that id (or is shorter than a nonce and a tag).
    Unauthentic(String),
    /// A plaintext job where `security.require_encryption` asks for encrypted ones.
    Plaintext,
}

impl Refusal {
    /// For the worker's log: which of the refusals this is.
    pub fn cause(&self) -> &'static str {
        match self {
            Refusal::Scheme(_) => "unsupported scheme",
            Refusal::NoKeyId => "no key id",
            Refusal::UnknownKey(_) => "unknown key id",
            Refusal::Unauthentic(_) => "the body does not authenticate under the key",
            Refusal::Plaintext => "plaintext refused",
        }
    }

    /// The key id the job named, when it named one.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Refusal::UnknownKey(id) | Refusal::Unauthentic(id) => Some(id),
            _ => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Scheme(Some(scheme)) => {
                write!(f, "header {ENCRYPTION_HEADER} {scheme:?} is not supported; the worker decrypts {SCHEME}")
            }
            Refusal::Scheme(None) => write!(f, "header {ENCRYPTION_HEADER} must be the string {SCHEME}"),
            Refusal::NoKeyId => {
                write!(f, "an encrypted job (header {ENCRYPTION_HEADER}) needs a {KEY_ID_HEADER} header naming its key")
            }
            Refusal::UnknownKey(id) | Refusal::Unauthentic(id) => {
                write!(f, "the job cannot be decrypted with key id {id:?}")
            }
            Refusal::Plaintext => write!(
                f,
                "this worker takes encrypted jobs only: encrypt the body with {SCHEME} and set headers \
                 {ENCRYPTION_HEADER} and {KEY_ID_HEADER}"
            ),
        }
    }
}

/// The worker's keys, by id, and whether plaintext jobs are refused. Cheap to clone.
#[derive(Clone, Default)]
pub struct Keyring {
    keys: Arc<HashMap<String, PayloadKey>>,
    require_encryption: bool,
}

/// Shows the key ids only.
impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        f.debug_struct("Keyring").field("ids", &ids).field("require_encryption", &self.require_encryption).finish()
    }
}

impl Keyring {
    /// Reads every key file of `files` (id → path, `security.payload_keys`).
    pub fn load(files: &BTreeMap<String, PathBuf>, require_encryption: bool) -> Result<Self, KeyError> {
        let mut keys = HashMap::with_capacity(files.len());
        for (id, path) in files {
            let key = PayloadKey::load(&format!("security.payload_keys.{id}"), id, path)?;
            keys.insert(id.clone(), key);
        }
        Ok(Self { keys: Arc::new(keys), require_encryption })
    }

    /// A keyring of the given keys.
    pub fn of(keys: impl IntoIterator<Item = PayloadKey>, require_encryption: bool) -> Self {
        let keys = keys.into_iter().map(|key| (key.id().to_string(), key)).collect();
        Self { keys: Arc::new(keys), require_encryption }
    }

    /// The key ids, sorted.
    pub fn ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    pub fn requires_encryption(&self) -> bool {
        self.require_encryption
    }

    /// The body a job is read from: `body` itself when the job is plaintext (and plaintext is
    /// allowed), else its plaintext when its `sealing` names a key of this ring under which it
    /// authenticates.
    pub fn open<'a>(&self, sealing: Option<Sealing<'_>>, body: &'a [u8]) -> Result<Opened<'a>, Refusal> {
        let Some(sealing) = sealing else {
            return if self.require_encryption { Err(Refusal::Plaintext) } else { Ok(Opened::Plain(body)) };
        };
        match sealing.scheme {
            Some(scheme) if scheme.eq_ignore_ascii_case(SCHEME) => {}
            other => return Err(Refusal::Scheme(other.map(str::to_string))),
        }
        let id = sealing.key_id.filter(|id| !id.is_empty()).ok_or(Refusal::NoKeyId)?;
        let key = self.keys.get(id).ok_or_else(|| Refusal::UnknownKey(id.to_string()))?;
        let plaintext = key.open(body).ok_or_else(|| Refusal::Unauthentic(id.to_string()))?;
        Ok(Opened::Sealed { plaintext, key: key.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
    }

    fn key(id: &str, byte: u8) -> PayloadKey {
        PayloadKey::new("test", id, &[byte; KEY_BYTES]).expect("valid key")
    }

    /// tests/fixtures/payload/vectors.json, written by scripts/build_payload_vectors.py with
    /// Python's `cryptography` (OpenSSL), its first vector the GCM specification's test case 15.
    #[test]
    fn seals_and_opens_the_known_answer_vectors_of_an_independent_implementation() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/payload/vectors.json");
        let vectors: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(&path).expect("vectors exist")).expect("vectors are JSON");
        assert!(vectors.len() >= 6, "{} vectors", vectors.len());
        assert_eq!(vectors[0]["name"], "gcm-spec-test-case-15");
        for vector in &vectors {
            let field = |name: &str| unhex(vector[name].as_str().expect("hex string"));
            let name = vector["name"].as_str().expect("name");
            let key_bytes: [u8; KEY_BYTES] = field("key").try_into().expect("32-byte key");
            let nonce: [u8; NONCE_BYTES] = field("nonce").try_into().expect("12-byte nonce");
            let (plaintext, sealed) = (field("plaintext"), field("sealed"));
            let key = PayloadKey::new("test", "kat", &key_bytes).expect("key");
            assert_eq!(key.seal_with_nonce(nonce, &plaintext), sealed, "{name}: sealed byte for byte");
            assert_eq!(key.open(&sealed).as_deref(), Some(&plaintext[..]), "{name}: opens");
            for at in [0, NONCE_BYTES, sealed.len() - 1] {
                let mut altered = sealed.clone();
                altered[at] ^= 0x01;
                assert_eq!(key.open(&altered), None, "{name}: byte {at} flipped must not open");
            }
        }
    }

    #[test]
    fn each_seal_draws_a_new_nonce_and_opens_to_the_plaintext() {
        let k1 = key("k1", 7);
        let plaintext = br#"{"job_id":"a","model":"m","rows":[[1.5,2]]}"#;
        let (first, second) = (k1.seal(plaintext), k1.seal(plaintext));
        assert_eq!(first.len(), plaintext.len() + OVERHEAD_BYTES);
        assert_ne!(first[..NONCE_BYTES], second[..NONCE_BYTES], "random nonces");
        assert_ne!(first, second);
        assert!(!first.windows(plaintext.len()).any(|w| w == plaintext), "no plaintext in the sealed body");
        assert_eq!(k1.open(&first).as_deref(), Some(&plaintext[..]));
        assert_eq!(k1.open(&second).as_deref(), Some(&plaintext[..]));
        assert_eq!(key("k1", 8).open(&first), None, "another key's bytes");
        assert_eq!(k1.open(&first[..OVERHEAD_BYTES - 1]), None, "shorter than a nonce and a tag");
    }

    #[test]
    fn the_keyring_opens_with_the_named_key_and_refuses_without_detail() {
        let ring = Keyring::of([key("2025-q1", 1), key("2025-q2", 2)], false);
        let body = br#"{"job_id":"a"}"#;
        for id in ["2025-q1", "2025-q2"] {
            let sealed = ring.keys[id].seal(body);
            let sealing = Sealing { scheme: Some(SCHEME), key_id: Some(id) };
            let opened = ring.open(Some(sealing), &sealed).expect("opens");
            assert_eq!((opened.body(), opened.key().map(PayloadKey::id)), (&body[..], Some(id)));
        }
        assert!(matches!(ring.open(None, body), Ok(Opened::Plain(b)) if b == body), "plaintext allowed");

        let sealed = ring.keys["2025-q1"].seal(body);
        let open = |scheme, key_id| ring.open(Some(Sealing { scheme, key_id }), &sealed).map(|o| o.body().to_vec());
        let unknown = open(Some(SCHEME), Some("2024-q4")).expect_err("unknown key");
        let wrong = open(Some(SCHEME), Some("2025-q2")).expect_err("does not authenticate");
        assert_eq!(
            (unknown.cause(), wrong.cause()),
            ("unknown key id", "the body does not authenticate under the key")
        );
        // The publisher is told the same for both.
        assert_eq!(unknown.to_string(), "the job cannot be decrypted with key id \"2024-q4\"");
        assert_eq!(wrong.to_string(), "the job cannot be decrypted with key id \"2025-q2\"");
        assert_eq!(open(Some("aes-128-cbc"), Some("2025-q1")), Err(Refusal::Scheme(Some("aes-128-cbc".into()))));
        assert_eq!(open(Some(SCHEME), None), Err(Refusal::NoKeyId));
        assert_eq!(open(Some("AES-256-GCM"), Some("2025-q1")), Ok(body.to_vec()), "scheme in any case");

        let strict = Keyring::of([key("k", 3)], true);
        assert_eq!(strict.open(None, body).map(|o| o.body().to_vec()), Err(Refusal::Plaintext));
    }

    #[test]
    fn key_files_are_raw_hex_or_base64_of_32_bytes() {
        let raw: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37).wrapping_add(128)).collect();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
        for content in [
            raw.clone(),
            hex.clone().into_bytes(),
            format!("{}\n", hex.to_uppercase()).into_bytes(),
            format!("  {b64}\r\n").into_bytes(),
            b64.trim_end_matches('=').as_bytes().to_vec(),
        ] {
            assert_eq!(&parse_key(&content).expect("a key")[..], &raw[..], "{content:?}");
        }
        let refused = |content: &[u8]| parse_key(content).expect_err("refused");
        assert!(refused(b"").contains("empty"));
        assert!(refused(&raw[..16]).contains("16 bytes"), "a short raw key");
        assert!(refused(&[raw.clone(), vec![0x80]].concat()).contains("33 bytes"));
        assert!(
            refused(&hex.as_bytes()[..32]).contains("128 bits"),
            "hex of a 128-bit key: {}",
            refused(&hex.as_bytes()[..32])
        );
        assert!(refused(format!("{}\n", &hex[..63]).as_bytes()).contains("63 hex digits"));
        let b64_16 = base64::engine::general_purpose::STANDARD.encode(&raw[..16]);
        assert!(refused(b64_16.as_bytes()).contains("base64 of 16 bytes"));
        assert!(refused(b"correct horse battery staple!!!!").contains("neither hex nor base64"));
    }

    #[test]
    fn key_file_errors_name_the_setting_the_file_and_the_fix_not_the_content() {
        let dir = std::env::temp_dir().join(format!("batchscore-payload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let short = dir.join("short.key");
        std::fs::write(&short, "00112233445566778899aabbccddeeff\n").expect("key file");
        let files = BTreeMap::from([("k1".to_string(), short.clone())]);
        let message = Keyring::load(&files, false).expect_err("short key").to_string();
        for needle in ["security.payload_keys.k1", &short.display().to_string(), "128 bits", "openssl rand -hex 32"] {
            assert!(message.contains(needle), "{needle:?} missing from: {message}");
        }
        assert!(!message.contains("00112233"), "the key's content leaked: {message}");

        let missing = BTreeMap::from([("k1".to_string(), dir.join("absent.key"))]);
        let message = Keyring::load(&missing, false).expect_err("missing key").to_string();
        assert!(message.contains("absent.key") && message.contains("No such file"), "{message}");

        let bad_id = BTreeMap::from([("Q1".to_string(), short)]);
        assert!(matches!(Keyring::load(&bad_id, false), Err(KeyError::BadId { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn key_ids_are_short_lower_case_names() {
        for id in ["k1", "2025-06", "risk.nightly_v2", &"a".repeat(MAX_KEY_ID_CHARS)] {
            assert!(valid_key_id(id), "{id}");
        }
        for id in ["", "Q1", "a b", "a/b", "ключ", &"a".repeat(MAX_KEY_ID_CHARS + 1)] {
            assert!(!valid_key_id(id), "{id}");
        }
    }

    #[test]
    fn debug_output_shows_ids_and_never_key_bytes() {
        let bytes = [0xA5u8; KEY_BYTES];
        let key = PayloadKey::new("test", "k1", &bytes).expect("key");
        let ring = Keyring::of([key.clone()], true);
        for shown in [format!("{key:?}"), format!("{ring:?}"), format!("{key:#?}")] {
            assert!(shown.contains("k1"), "{shown}");
            for leak in ["a5", "A5", "165"] {
                assert!(!shown.contains(leak), "{leak} in {shown}");
            }
        }
    }
}
