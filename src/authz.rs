//! Authorization, the stage between decoding and batching: who may score which model, and where a
//! publisher may have its results sent. It judges a job's [`Origin`] (the publisher RabbitMQ
//! authenticated, from the AMQP `user_id` property, and the job's `reply_to`) against the
//! `security` settings and the model's `allowed_publishers`; a job it refuses is answered
//! `forbidden` and never reaches a batcher. It also names publishers in metrics, from a bounded
//! set ([`PublisherLabels`]). Pure: no I/O, no transport.
//!
//! The identity is only as good as the broker's check: RabbitMQ refuses a message whose `user_id`
//! is not the user the publishing connection logged in as, unless that user has the
//! `impersonator` tag.

use std::collections::{BTreeSet, HashMap};

use crate::flow::{Origin, Rejection};
use crate::settings::SecuritySettings;

/// `publisher` label of jobs without a `user_id`.
pub const NO_PUBLISHER_LABEL: &str = "none";
/// `publisher` label of identities that no setting and no served model names.
pub const OTHER_PUBLISHER_LABEL: &str = "other";
/// Stands for the publisher's user name in a `security.reply_to` pattern.
pub const USER_PLACEHOLDER: &str = "{user}";

/// The `security` settings, ready to judge jobs.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    require_user_id: bool,
    /// `None`: no `security.reply_to` rule, any reply queue may be named.
    reply_to: Option<ReplyRules>,
    /// Publishers the settings name, counted by name in metrics.
    named: BTreeSet<String>,
}

/// `security.reply_to`: the default pattern and each publisher's own.
#[derive(Debug, Clone)]
struct ReplyRules {
    default: Option<ReplyPattern>,
    publishers: HashMap<String, ReplyPattern>,
}

impl Policy {
    pub fn new(settings: &SecuritySettings) -> Self {
        let rules = &settings.reply_to;
        let reply_to = (rules.default.is_some() || !rules.publishers.is_empty()).then(|| ReplyRules {
            default: rules.default.as_deref().map(ReplyPattern::new),
            publishers: rules.publishers.iter().map(|(user, p)| (user.clone(), ReplyPattern::new(p))).collect(),
        });
        let named = settings.known_publishers.iter().chain(rules.publishers.keys()).cloned().collect();
        Self { require_user_id: settings.require_user_id, reply_to, named }
    }

    /// The checks that need only the message, made before its body is read: an identity where
    /// every job needs one, and a reply queue the publisher may name. A job refused here is
    /// `forbidden` whatever else is wrong with it.
    pub fn admit(&self, origin: &Origin) -> Result<(), Rejection> {
        if self.require_user_id && origin.publisher.is_none() {
            return Err(Rejection::Forbidden(
                "the job has no user_id property, and this worker scores only jobs of identified publishers \
                 (security.require_user_id); publish with user_id set to the user you log in to the broker as"
                    .into(),
            ));
        }
        if !self.may_reply_to(origin) {
            let queue = origin.reply_to.as_deref().unwrap_or_default();
            let publisher = origin.publisher.as_deref().map_or("a job without user_id".into(), |p| format!("{p:?}"));
            return Err(Rejection::Forbidden(format!(
                "reply_to {queue:?} is not a queue {publisher} may have results sent to (security.reply_to); \
                 its result goes to the results queue instead"
            )));
        }
        Ok(())
    }

    /// Whether the job's result may go to its `reply_to`: always for a job without one (its result
    /// goes to the results queue); with `security.reply_to` rules, only to a queue that the
    /// publisher's pattern (its own, else the default) matches. A job without `user_id` has no
    /// user for `{user}`, so only a pattern without it can match its reply queue.
    pub fn may_reply_to(&self, origin: &Origin) -> bool {
        let (Some(rules), Some(queue)) = (&self.reply_to, origin.reply_to.as_deref()) else { return true };
        let user = origin.publisher.as_deref();
        let pattern = user.and_then(|user| rules.publishers.get(user)).or(rules.default.as_ref());
        pattern.is_some_and(|pattern| pattern.matches(queue, user))
    }

    /// The model's own rule: with `allowed_publishers` in its config.yaml (`allowed`), only the
    /// publishers listed there may score it, and a job without `user_id` may not.
    pub fn permit(&self, origin: &Origin, model: &str, allowed: Option<&[String]>) -> Result<(), Rejection> {
        let Some(allowed) = allowed else { return Ok(()) };
        match origin.publisher.as_deref() {
            Some(publisher) if allowed.iter().any(|a| a == publisher) => Ok(()),
            Some(publisher) => Err(Rejection::Forbidden(format!(
                "publisher {publisher:?} may not score model {model} (allowed_publishers in its config.yaml)"
            ))),
            None => Err(Rejection::Forbidden(format!(
                "model {model} scores only jobs of the publishers its config.yaml lists (allowed_publishers), and \
                 the job has no user_id property; publish with user_id set to the user you log in to the broker as"
            ))),
        }
    }
}

/// A `security.reply_to` pattern: `*` stands for any run of characters (none included),
/// [`USER_PLACEHOLDER`] for the publisher's user name, taken literally; every other character
/// stands for itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyPattern(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    User,
    Any,
}

impl ReplyPattern {
    pub fn new(text: &str) -> Self {
        let mut parts = Vec::new();
        for (i, piece) in text.split(USER_PLACEHOLDER).enumerate() {
            if i > 0 {
                parts.push(Part::User);
            }
            for (j, literal) in piece.split('*').enumerate() {
                if j > 0 {
                    parts.push(Part::Any);
                }
                if !literal.is_empty() {
                    parts.push(Part::Literal(literal.to_string()));
                }
            }
        }
        Self(parts)
    }

    /// Whether `queue` matches, `{user}` being `user`; a pattern with `{user}` matches nothing
    /// without one.
    pub fn matches(&self, queue: &str, user: Option<&str>) -> bool {
        let mut literals = Vec::with_capacity(self.0.len());
        for part in &self.0 {
            literals.push(match part {
                Part::Literal(text) => Some(text.as_str()),
                Part::User => Some(match user {
                    Some(user) => user,
                    None => return false,
                }),
                Part::Any => None,
            });
        }
        glob(&literals, queue)
    }
}

/// `pieces` (a literal, or `None` for `*`) match the whole of `text`. Greedy with one point to
/// return to, the last `*`: linear for the patterns a person writes, never exponential.
fn glob(pieces: &[Option<&str>], text: &str) -> bool {
    let (mut p, mut t) = (0, 0);
    // The piece after the last `*` seen, and where in `text` that `*` stopped swallowing.
    let mut resume: Option<(usize, usize)> = None;
    loop {
        match pieces.get(p) {
            Some(None) => {
                p += 1;
                resume = Some((p, t));
            }
            Some(Some(literal)) if text[t..].starts_with(literal) => {
                p += 1;
                t += literal.len();
            }
            None if t == text.len() => return true,
            _ => {
                // Let the last `*` swallow one more character and try again from there.
                let Some((after_star, from)) = resume else { return false };
                let Some(c) = text[from..].chars().next() else { return false };
                resume = Some((after_star, from + c.len_utf8()));
                (p, t) = (after_star, from + c.len_utf8());
            }
        }
    }
}

/// The `publisher` label of a job: its user when a setting or a served model's
/// `allowed_publishers` names it, [`OTHER_PUBLISHER_LABEL`] for any other user, and
/// [`NO_PUBLISHER_LABEL`] without `user_id`. The label set is thus bounded by the configuration,
/// not by what publishers send.
#[derive(Debug, Clone, Default)]
pub struct PublisherLabels(BTreeSet<String>);

impl PublisherLabels {
    /// The names of `policy` and of every model's `allowed_publishers`.
    pub fn new<'a>(policy: &Policy, allowed: impl IntoIterator<Item = Option<&'a [String]>>) -> Self {
        let mut named = policy.named.clone();
        named.extend(allowed.into_iter().flatten().flatten().cloned());
        Self(named)
    }

    pub fn label<'a>(&'a self, publisher: Option<&'a str>) -> &'a str {
        match publisher {
            None => NO_PUBLISHER_LABEL,
            Some(user) if self.0.contains(user) => user,
            Some(_) => OTHER_PUBLISHER_LABEL,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::flow::ErrorCode;
    use crate::settings::ReplyToSettings;

    fn origin(publisher: Option<&str>, reply_to: Option<&str>) -> Origin {
        Origin { publisher: publisher.map(Arc::from), reply_to: reply_to.map(str::to_string) }
    }

    fn policy(require_user_id: bool, default: Option<&str>, publishers: &[(&str, &str)]) -> Policy {
        Policy::new(&SecuritySettings {
            require_user_id,
            known_publishers: vec!["batch-ops".into()],
            reply_to: ReplyToSettings {
                default: default.map(str::to_string),
                publishers: publishers.iter().map(|(u, p)| (u.to_string(), p.to_string())).collect::<BTreeMap<_, _>>(),
            },
            ..SecuritySettings::default()
        })
    }

    fn forbidden(outcome: Result<(), Rejection>) -> String {
        match outcome {
            Err(rejection) => {
                assert_eq!(rejection.code(), ErrorCode::Forbidden);
                assert!(rejection.dead_letters(), "a forbidden job is dead-lettered");
                rejection.message().to_string()
            }
            Ok(()) => panic!("expected forbidden"),
        }
    }

    #[test]
    fn the_default_settings_admit_every_job() {
        let open = Policy::default();
        for job in [origin(None, None), origin(None, Some("any.queue")), origin(Some("core-banking"), Some("x"))] {
            assert_eq!(open.admit(&job), Ok(()));
            assert_eq!(open.permit(&job, "m", None), Ok(()));
        }
    }

    #[test]
    fn require_user_id_refuses_anonymous_jobs_only() {
        let strict = policy(true, None, &[]);
        let message = forbidden(strict.admit(&origin(None, None)));
        assert!(message.contains("user_id") && message.contains("security.require_user_id"), "{message}");
        assert_eq!(strict.admit(&origin(Some("core-banking"), None)), Ok(()));
    }

    #[test]
    fn allowed_publishers_admit_the_listed_users_only() {
        let open = Policy::default();
        let allowed = ["core-banking".to_string(), "risk-nightly".to_string()];
        assert_eq!(open.permit(&origin(Some("risk-nightly"), None), "pd", Some(&allowed)), Ok(()));
        let message = forbidden(open.permit(&origin(Some("marketing"), None), "pd", Some(&allowed)));
        assert!(message.contains("\"marketing\"") && message.contains("model pd"), "{message}");
        let message = forbidden(open.permit(&origin(None, None), "pd", Some(&allowed)));
        assert!(message.contains("no user_id") && message.contains("allowed_publishers"), "{message}");
        // An empty list closes the model.
        forbidden(open.permit(&origin(Some("core-banking"), None), "pd", Some(&[])));
        // Names are compared exactly.
        forbidden(open.permit(&origin(Some("Core-Banking"), None), "pd", Some(&allowed)));
    }

    #[test]
    fn reply_to_follows_the_publishers_pattern_else_the_default() {
        let rules = policy(false, Some("{user}.results*"), &[("risk-nightly", "risk.*")]);
        let allowed = |publisher, queue| rules.may_reply_to(&origin(publisher, queue));
        assert!(allowed(Some("core-banking"), Some("core-banking.results")));
        assert!(allowed(Some("core-banking"), Some("core-banking.results.eu")));
        assert!(!allowed(Some("core-banking"), Some("risk-nightly.results")), "another user's queue");
        assert!(!allowed(Some("core-banking"), Some("x.results")));
        // A publisher's own pattern replaces the default.
        assert!(allowed(Some("risk-nightly"), Some("risk.run-17")));
        assert!(!allowed(Some("risk-nightly"), Some("risk-nightly.results")));
        // Without user_id nothing stands for {user}.
        assert!(!allowed(None, Some("core-banking.results")));
        // A job without reply_to goes to the results queue: always allowed.
        assert!(allowed(Some("core-banking"), None) && allowed(None, None));

        let message = forbidden(rules.admit(&origin(Some("core-banking"), Some("risk.run-17"))));
        assert!(message.contains("\"risk.run-17\"") && message.contains("\"core-banking\""), "{message}");
        assert!(message.contains("security.reply_to"), "{message}");
    }

    #[test]
    fn without_a_default_only_the_listed_publishers_may_name_a_reply_queue() {
        let rules = policy(false, None, &[("risk-nightly", "risk.*")]);
        assert!(rules.may_reply_to(&origin(Some("risk-nightly"), Some("risk.a"))));
        assert!(!rules.may_reply_to(&origin(Some("core-banking"), Some("core-banking.results"))));
        assert!(!rules.may_reply_to(&origin(None, Some("risk.a"))));
        assert!(rules.may_reply_to(&origin(Some("core-banking"), None)));
    }

    #[test]
    fn a_pattern_without_user_applies_to_jobs_without_user_id_too() {
        let rules = policy(false, Some("shared.replies.*"), &[]);
        assert!(rules.may_reply_to(&origin(None, Some("shared.replies.7"))));
        assert!(!rules.may_reply_to(&origin(None, Some("scoring.results"))));
    }

    #[test]
    fn patterns_match_whole_names_with_star_as_any_run() {
        let cases = [
            ("a.results", "a.results", true),
            ("a.results", "a.results2", false),
            ("a.results", "xa.results", false),
            ("a.*", "a.", true),
            ("a.*", "a.b.c", true),
            ("*", "", true),
            ("*.results", "x.y.results", true),
            ("*.results", "x.results.y", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXcYb", false),
            ("**", "anything", true),
            ("é*ü", "éßü", true),
            // Characters other than `*` and {user} stand for themselves.
            ("a?b", "axb", false),
            ("a?b", "a?b", true),
            ("a.b", "aXb", false),
        ];
        for (pattern, queue, expected) in cases {
            assert_eq!(ReplyPattern::new(pattern).matches(queue, None), expected, "{pattern} ~ {queue}");
        }
    }

    #[test]
    fn the_user_is_taken_literally() {
        let pattern = ReplyPattern::new("{user}.results*");
        assert!(pattern.matches("a*b.results", Some("a*b")));
        assert!(!pattern.matches("aXb.results", Some("a*b")), "a * in a user name is no wildcard");
        assert!(!pattern.matches("core.results", None));
        let twice = ReplyPattern::new("{user}.{user}");
        assert!(twice.matches("u.u", Some("u")) && !twice.matches("u.v", Some("u")));
    }

    #[test]
    fn a_long_text_against_many_stars_stays_fast() {
        let text = "a".repeat(10_000);
        let pattern = ReplyPattern::new("*a*a*a*a*a*a*a*a*b");
        let started = std::time::Instant::now();
        assert!(!pattern.matches(&text, None));
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
    }

    #[test]
    fn publisher_labels_are_the_named_users_other_and_none() {
        let policy = policy(true, None, &[("risk-nightly", "risk.*")]);
        let listed = vec!["core-banking".to_string()];
        let labels = PublisherLabels::new(&policy, [Some(listed.as_slice()), None]);
        assert_eq!(labels.label(Some("core-banking")), "core-banking", "named by a model");
        assert_eq!(labels.label(Some("risk-nightly")), "risk-nightly", "named by security.reply_to");
        assert_eq!(labels.label(Some("batch-ops")), "batch-ops", "named by security.known_publishers");
        assert_eq!(labels.label(Some("someone-else")), OTHER_PUBLISHER_LABEL);
        assert_eq!(labels.label(None), NO_PUBLISHER_LABEL);
    }
}
