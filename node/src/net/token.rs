//! The cluster's join token and the proofs that each side of a join holds it.
//!
//! What it defends: the TLS handshake ([`super::tls`]) proves *who* a node is, not that it
//! belongs to this cluster; any machine on the LAN can make a key. The join token is the
//! shared secret that decides membership: a worker without it cannot join (and so cannot
//! receive weights or prompts' activations), and a coordinator without it cannot recruit a
//! worker's compute (it merely answered on the right port, or spoofed discovery).
//!
//! The token itself never travels. Each side sends an HMAC-SHA256 proof keyed by the token
//! over a label, its role and both node ids, which the TLS handshake has already proven:
//! - a proof captured on the wire is useless to another node, because it names the two
//!   identities of that connection and only their key holders can complete a handshake as
//!   them;
//! - the role byte string makes the worker's proof and the coordinator's differ, so a
//!   coordinator impostor cannot reflect the worker's proof back as its own;
//! - every field is length-prefixed, so no two different (role, ids) triples hash the same
//!   bytes.
//!
//! Proofs are compared in constant time ([`proofs_equal`]), so response timing does not
//! reveal how many bytes of a guess were right. The token's strength is the user's choice
//! when given by hand (8 characters at least); [`JoinToken::generate`] gives 160 bits.

use anyhow::bail;
use hmac::digest::CtOutput;
use hmac::{Hmac, Mac};
use potluck_protocol::JOIN_CHALLENGE_LABEL;
use rand::Rng;
use sha2::Sha256;

/// Shortest token accepted from a user: below this, guessing is too easy even for a LAN.
pub const TOKEN_CHARS_MIN: usize = 8;

/// Longest token accepted from a user (a generous bound; it is typed or pasted).
pub const TOKEN_CHARS_MAX: usize = 256;

/// Prefix of generated tokens, so one is recognisable in a config file or a shell history.
pub const GENERATED_TOKEN_PREFIX: &str = "plk-";

/// Random characters in a generated token; with a 32-symbol alphabet, 5 bits each: 160 bits.
pub const GENERATED_TOKEN_RANDOM_CHARS: usize = 32;

/// The generated tokens' alphabet: lowercase letters and digits without the look-alikes
/// `0 o 1 l`, so a token read aloud or copied by hand survives. 32 symbols, so drawing an
/// index uniformly gives exactly 5 bits per character.
const GENERATED_TOKEN_ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";

const _: () = assert!(GENERATED_TOKEN_RANDOM_CHARS * 5 >= 128);
const _: () =
    assert!(GENERATED_TOKEN_PREFIX.len() + GENERATED_TOKEN_RANDOM_CHARS <= TOKEN_CHARS_MAX);

/// The role strings in the proofs.
const WORKER_ROLE: &[u8] = b"worker";
const COORDINATOR_ROLE: &[u8] = b"coordinator";

/// The cluster's join token: 8..=256 printable ASCII characters, no whitespace. There is
/// deliberately no `Display` and `Debug` prints `JoinToken(****)`, so the secret only
/// reaches a log or a screen through an explicit [`JoinToken::as_str`].
#[derive(Clone)]
pub struct JoinToken {
    token: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(****)")
    }
}

impl JoinToken {
    /// A new random token: [`GENERATED_TOKEN_PREFIX`] and 32 characters (160 bits) from the
    /// thread's CSPRNG (ChaCha seeded by the OS).
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let mut token =
            String::with_capacity(GENERATED_TOKEN_PREFIX.len() + GENERATED_TOKEN_RANDOM_CHARS);
        token.push_str(GENERATED_TOKEN_PREFIX);
        for _ in 0..GENERATED_TOKEN_RANDOM_CHARS {
            token.push(char::from(
                GENERATED_TOKEN_ALPHABET[rng.random_range(0..GENERATED_TOKEN_ALPHABET.len())],
            ));
        }
        Self { token }
    }

    /// Accepts any user-given token of [`TOKEN_CHARS_MIN`]..=[`TOKEN_CHARS_MAX`] printable
    /// ASCII characters without whitespace. Errors say what is wrong and where, never echo
    /// the token (it may be a real secret with a typo). Surrounding whitespace is an error
    /// too, not trimmed: callers reading a token from a file trim it themselves.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        for (position, c) in s.chars().enumerate() {
            let position = position + 1;
            if c.is_whitespace() {
                bail!("the join token contains whitespace (character {position}); tokens are one word");
            }
            if !c.is_ascii() {
                bail!("the join token contains a non-ASCII character (character {position}); use printable ASCII only");
            }
            if c.is_ascii_control() {
                bail!("the join token contains a control character (character {position}); use printable ASCII only");
            }
        }
        // All ASCII from here: bytes are characters.
        let len = s.len();
        if len < TOKEN_CHARS_MIN {
            bail!("the join token is too short ({len} characters; at least {TOKEN_CHARS_MIN})");
        }
        if len > TOKEN_CHARS_MAX {
            bail!("the join token is too long ({len} characters; at most {TOKEN_CHARS_MAX})");
        }
        Ok(Self {
            token: s.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.token
    }

    /// The token kept in `path` (the coordinator keeps one beside its identity, so workers
    /// keep their token across coordinator restarts), or a new random one saved there,
    /// readable by its owner only. Safe when several processes start at once with one
    /// config directory: all of them end up with the token of whichever created the file.
    pub fn load_or_create(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        if let Some(token) = Self::load(path)? {
            return Ok(token);
        }
        let token = Self::generate();
        let created = super::identity::create_private_file(path, token.as_str().as_bytes())
            .with_context(|| format!("cannot save the join token to {}", path.display()))?;
        if created {
            return Ok(token);
        }
        Self::load(path)?.with_context(|| format!("the join token file {} vanished while loading", path.display()))
    }

    /// The token in `path`, `None` when there is no such file.
    fn load(path: &std::path::Path) -> anyhow::Result<Option<Self>> {
        use anyhow::Context;
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(text.trim())
                .with_context(|| format!("the join token in {} is not valid", path.display()))
                .map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// The worker's proof: HMAC-SHA256 keyed by the token over
    /// [`JOIN_CHALLENGE_LABEL`], `"worker"`, `coordinator_id` and `worker_id`, each preceded
    /// by its length as a u32 little-endian. The ids are the TLS-verified node ids of the
    /// connection, so the proof cannot be replayed by another node.
    pub fn worker_proof(&self, coordinator_id: &str, worker_id: &str) -> [u8; 32] {
        self.proof(WORKER_ROLE, coordinator_id, worker_id)
    }

    /// Same with role `"coordinator"`: the coordinator proves it knows the token too, so a
    /// worker never hands its compute to an impostor.
    pub fn coordinator_proof(&self, coordinator_id: &str, worker_id: &str) -> [u8; 32] {
        self.proof(COORDINATOR_ROLE, coordinator_id, worker_id)
    }

    fn proof(&self, role: &[u8], coordinator_id: &str, worker_id: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.token.as_bytes())
            .expect("HMAC takes keys of any length");
        for field in [
            JOIN_CHALLENGE_LABEL,
            role,
            coordinator_id.as_bytes(),
            worker_id.as_bytes(),
        ] {
            // Fields are node ids and constants, far below 4 GiB; saturate rather than wrap
            // so a pathological caller still cannot alias two inputs cheaply.
            let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
            mac.update(&len.to_le_bytes());
            mac.update(field);
        }
        mac.finalize().into_bytes().into()
    }
}

/// Constant-time comparison of two proofs (through `subtle`, as `hmac` verifies tags), so
/// the time to refuse a wrong proof does not depend on where it first differs.
pub fn proofs_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    CtOutput::<Hmac<Sha256>>::new((*a).into()) == CtOutput::<Hmac<Sha256>>::new((*b).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COORDINATOR: &str = "12D3KooWCoordinatorCoordinatorCoordinator";
    const WORKER: &str = "12D3KooWWorkerWorkerWorkerWorkerWorkerWork";

    fn token(s: &str) -> JoinToken {
        JoinToken::parse(s).unwrap()
    }

    #[test]
    fn proofs_differ_by_role() {
        let t = token("correct-horse");
        assert_ne!(
            t.worker_proof(COORDINATOR, WORKER),
            t.coordinator_proof(COORDINATOR, WORKER)
        );
    }

    #[test]
    fn proofs_differ_by_id_order() {
        let t = token("s3cret-token");
        assert_ne!(
            t.worker_proof(COORDINATOR, WORKER),
            t.worker_proof(WORKER, COORDINATOR)
        );
        assert_ne!(
            t.coordinator_proof(COORDINATOR, WORKER),
            t.coordinator_proof(WORKER, COORDINATOR)
        );
    }

    #[test]
    fn proofs_differ_by_token_and_are_deterministic() {
        let a = token("s3cret-token");
        let b = token("s3cret-tokem");
        assert_ne!(
            a.worker_proof(COORDINATOR, WORKER),
            b.worker_proof(COORDINATOR, WORKER)
        );
        assert_eq!(
            a.worker_proof(COORDINATOR, WORKER),
            token("s3cret-token").worker_proof(COORDINATOR, WORKER)
        );
    }

    #[test]
    fn fields_cannot_be_shifted_between_ids() {
        let t = token("s3cret-token");
        assert_ne!(t.worker_proof("ab", "c"), t.worker_proof("a", "bc"));
        assert_ne!(t.worker_proof("", "abc"), t.worker_proof("abc", ""));
    }

    #[test]
    fn the_proof_is_the_documented_hmac() {
        let t = token("s3cret-token");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret-token").unwrap();
        for field in [JOIN_CHALLENGE_LABEL, b"worker".as_slice(), b"c", b"w"] {
            mac.update(&(field.len() as u32).to_le_bytes());
            mac.update(field);
        }
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(t.worker_proof("c", "w"), expected);
    }

    #[test]
    fn generated_tokens_differ_and_round_trip() {
        let a = JoinToken::generate();
        let b = JoinToken::generate();
        assert_ne!(a.as_str(), b.as_str());
        for t in [a, b] {
            assert!(t.as_str().starts_with(GENERATED_TOKEN_PREFIX));
            assert_eq!(
                t.as_str().len(),
                GENERATED_TOKEN_PREFIX.len() + GENERATED_TOKEN_RANDOM_CHARS
            );
            assert_eq!(JoinToken::parse(t.as_str()).unwrap().as_str(), t.as_str());
        }
    }

    #[test]
    fn bad_tokens_are_refused_with_the_reason() {
        let cases = [
            ("abc12", "too short"),
            ("", "too short"),
            ("has white space", "whitespace"),
            ("trailing-newline\n", "whitespace"),
            ("tab\there-long", "whitespace"),
            ("nön-ascii-token", "non-ASCII"),
            ("control\u{7}-char", "control character"),
        ];
        for (input, reason) in cases {
            let message = JoinToken::parse(input).unwrap_err().to_string();
            assert!(message.contains(reason), "{input:?}: {message}");
            if input.len() > 4 {
                assert!(
                    !message.contains(input),
                    "the error echoes the token: {message}"
                );
            }
        }
        let long = "x".repeat(TOKEN_CHARS_MAX + 1);
        assert!(JoinToken::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("too long"));
        assert!(JoinToken::parse(&"x".repeat(TOKEN_CHARS_MAX)).is_ok());
        assert!(JoinToken::parse(&"x".repeat(TOKEN_CHARS_MIN)).is_ok());
        assert!(JoinToken::parse("~!@#$%^&*()_+{}|:\"<>?").is_ok());
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = token("super-secret-token");
        let shown = format!("{t:?}");
        assert_eq!(shown, "JoinToken(****)");
        assert!(!format!("{:?}", Some(t)).contains("secret"));
    }

    #[test]
    fn proofs_equal_compares_every_byte() {
        let t = token("s3cret-token");
        let p = t.worker_proof(COORDINATOR, WORKER);
        let same = p;
        assert!(proofs_equal(&p, &same));
        for i in [0, 17, 31] {
            let mut q = p;
            q[i] ^= 1;
            assert!(!proofs_equal(&p, &q));
        }
    }
}
