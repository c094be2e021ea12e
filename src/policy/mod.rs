//! Access policy: per-app access modes and rules, and the one pure function that decides.
//!
//! `evaluate` is the only place a `Permit` can be made, and the proxy will only forward with
//! one. Deny rules win over allow rules regardless of order, so adding a rule can never turn a
//! deny into an allow by accident of position.

use std::fmt;

use crate::identity::Identity;

/// How an app may be reached. Every app states one; there is no implicit default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Anyone, logged in or not. Identity headers are still sent when there is a session.
    Public,
    /// Any logged-in user.
    Authenticated,
    /// Logged-in users that an allow rule matches and no deny rule matches.
    Rules(Vec<Rule>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub effect: Effect,
    pub users: Vec<String>,
    pub groups: Vec<String>,
}

impl Rule {
    fn matches(&self, who: &Identity) -> bool {
        self.users.contains(&who.user) || self.groups.iter().any(|g| who.groups.iter().any(|h| h == g))
    }
}

/// Proof that policy allowed this request to this app. Only `evaluate` can make one; the
/// proxy consumes it.
#[derive(Debug)]
pub struct Permit {
    app: usize,
    _private: (),
}

impl Permit {
    /// Index of the app in the config this permit was made for.
    pub fn app(&self) -> usize {
        self.app
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// A deny rule (by its position in the app's rule list) matched.
    DenyRule(usize),
    /// No allow rule matched.
    NoRuleMatched,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::DenyRule(i) => write!(f, "deny rule {i} matched"),
            DenyReason::NoRuleMatched => f.write_str("no allow rule matched"),
        }
    }
}

#[derive(Debug)]
pub enum Decision {
    Allow(Permit),
    /// Not logged in (or the session is gone): log in first.
    Authenticate,
    Deny(DenyReason),
}

/// Decides whether `who` (None: no valid session) may use the app at `app_index` with `access`.
pub fn evaluate(app_index: usize, access: &Access, who: Option<&Identity>) -> Decision {
    let allow = || {
        Decision::Allow(Permit {
            app: app_index,
            _private: (),
        })
    };
    match (access, who) {
        (Access::Public, _) => allow(),
        (_, None) => Decision::Authenticate,
        (Access::Authenticated, Some(_)) => allow(),
        (Access::Rules(rules), Some(who)) => {
            if let Some(i) = rules.iter().position(|r| r.effect == Effect::Deny && r.matches(who)) {
                return Decision::Deny(DenyReason::DenyRule(i));
            }
            if rules.iter().any(|r| r.effect == Effect::Allow && r.matches(who)) {
                allow()
            } else {
                Decision::Deny(DenyReason::NoRuleMatched)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(user: &str, groups: &[&str]) -> Identity {
        Identity {
            user: user.into(),
            email: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn rule(effect: Effect, users: &[&str], groups: &[&str]) -> Rule {
        Rule {
            effect,
            users: users.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn table() {
        let staff_not_bob = Access::Rules(vec![
            rule(Effect::Allow, &[], &["staff"]),
            rule(Effect::Deny, &["bob"], &[]),
            rule(Effect::Allow, &["carol"], &[]),
        ]);
        let empty = Access::Rules(vec![]);
        let alice = who("alice", &["staff"]);
        let bob = who("bob", &["staff"]);
        let carol = who("carol", &[]);
        let dave = who("dave", &["sales"]);
        let cases: Vec<(&Access, Option<&Identity>, &str)> = vec![
            (&Access::Public, None, "allow"),
            (&Access::Public, Some(&dave), "allow"),
            (&Access::Authenticated, None, "login"),
            (&Access::Authenticated, Some(&dave), "allow"),
            (&staff_not_bob, None, "login"),
            (&staff_not_bob, Some(&alice), "allow"),
            (&staff_not_bob, Some(&bob), "deny rule 1 matched"),
            (&staff_not_bob, Some(&carol), "allow"),
            (&staff_not_bob, Some(&dave), "no allow rule matched"),
            (&empty, Some(&alice), "no allow rule matched"),
        ];
        for (access, who, want) in cases {
            let got = match evaluate(7, access, who) {
                Decision::Allow(p) => {
                    assert_eq!(p.app(), 7);
                    "allow".to_string()
                }
                Decision::Authenticate => "login".to_string(),
                Decision::Deny(r) => r.to_string(),
            };
            assert_eq!(got, want, "{access:?} {who:?}");
        }
    }

    proptest::proptest! {
        /// Adding any rule to a list never turns a deny into an allow unless it is an allow
        /// rule, and a matching deny rule always wins wherever it stands.
        #[test]
        fn deny_rules_always_win(groups in proptest::collection::vec("[abc]", 0..3), pos in 0usize..4) {
            let who = who("u", &groups.iter().map(|s| s.as_str()).collect::<Vec<_>>());
            let mut rules = vec![rule(Effect::Allow, &[], &["a"]), rule(Effect::Allow, &[], &["b"]), rule(Effect::Allow, &["u"], &[])];
            rules.insert(pos.min(rules.len()), rule(Effect::Deny, &["u"], &[]));
            proptest::prop_assert!(matches!(evaluate(0, &Access::Rules(rules), Some(&who)), Decision::Deny(DenyReason::DenyRule(_))));
        }
    }
}
