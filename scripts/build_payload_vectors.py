"""Build the known-answer vectors of payload encryption (src/payload.rs) with an independent
implementation: the ``cryptography`` package's AESGCM (OpenSSL underneath), itself checked here
against test case 15 of the GCM specification, the first vector of the file.

A sealed body is ``nonce (12 bytes) || ciphertext || tag (16 bytes)``, AES-256-GCM with no
associated data: exactly what AESGCM(key).encrypt(nonce, plaintext, None) returns, prefixed with
the nonce. Keys and nonces here are fixed (derived from labels with SHA-256), so running the
script again writes the same file; real nonces are random.

Writes ``tests/fixtures/payload/vectors.json``: a list of
``{"name", "key", "nonce", "plaintext", "sealed"}``, every value hex. The unit tests of
src/payload.rs seal each plaintext with the key and nonce and must get ``sealed`` byte for byte,
open ``sealed`` and get the plaintext back, and refuse ``sealed`` with any byte flipped.

Run from the repository root (pip install cryptography):

    python3 scripts/build_payload_vectors.py          # writes the file
    python3 scripts/build_payload_vectors.py --check  # fails when the committed file differs
"""

import hashlib
import json
import pathlib
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

OUT = pathlib.Path("tests/fixtures/payload/vectors.json")


def derive(label, size):
    return hashlib.sha256(label.encode()).digest()[:size]


def cases():
    job = json.dumps(
        {"job_id": "kat-1", "model": "linear", "rows": [[0.125, 4711.5, 3, -2.75]]}, separators=(",", ":")
    ).encode()
    # Several AES blocks and a partial last one: 1000 bytes.
    long = bytes((i * 7 + 3) % 256 for i in range(1000))
    return [
        ("empty", b""),
        ("one-byte", b"\x00"),
        ("one-block", b"sixteen bytes!!!"),
        ("job", job),
        ("thousand-bytes", long),
    ]


# Test case 15 of the GCM specification (McGrew and Viega, "The Galois/Counter Mode of Operation",
# 2005): AES-256, a 96-bit IV, no associated data, with its published ciphertext and tag.
SPEC_KEY = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308"
SPEC_NONCE = "cafebabefacedbaddecaf888"
SPEC_PLAINTEXT = (
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255"
)
SPEC_CIPHERTEXT_AND_TAG = (
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad"
    "b094dac5d93471bdec1a502270e3cc6c"
)


def vector(name, key, nonce, plaintext):
    sealed = nonce + AESGCM(key).encrypt(nonce, plaintext, None)
    assert len(sealed) == 12 + len(plaintext) + 16
    return {"name": name, "key": key.hex(), "nonce": nonce.hex(), "plaintext": plaintext.hex(), "sealed": sealed.hex()}


def vectors():
    spec = vector(
        "gcm-spec-test-case-15",
        bytes.fromhex(SPEC_KEY),
        bytes.fromhex(SPEC_NONCE),
        bytes.fromhex(SPEC_PLAINTEXT),
    )
    # The implementation used here agrees with the specification's own answer.
    assert spec["sealed"] == SPEC_NONCE + SPEC_CIPHERTEXT_AND_TAG, spec["sealed"]
    out = [spec]
    for name, plaintext in cases():
        key = derive(f"batchscore payload key {name}", 32)
        nonce = derive(f"batchscore payload nonce {name}", 12)
        out.append(vector(name, key, nonce, plaintext))
    return out


def main():
    text = json.dumps(vectors(), indent=2) + "\n"
    if "--check" in sys.argv[1:]:
        if OUT.read_text() != text:
            sys.exit(f"{OUT} differs from what the script writes; run it again and commit the file")
        print(f"{OUT}: up to date")
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
