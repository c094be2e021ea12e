//! Access policy: per-app access modes and rules, and the one pure function that decides.
//!
//! `evaluate` is the only place a `Permit` can be made, and the proxy will only forward with
//! one. Deny rules win over allow rules regardless of order, so adding a rule can never turn a
//! deny into an allow by accident of position.

use std::fmt;

use crate::names::Identity;

pub use crate::config::access::{Access, Effect, Rule};

/// Whether `rule` names `who` or one of their groups.
fn matches(rule: &Rule, who: &Identity) -> bool {
    rule.users.contains(&who.user) || rule.groups.iter().any(|g| who.groups.iter().any(|h| h == g))
}

/// What a permit opens: an app or a tunnel, by its name in the config (a name stays the
/// entry's own across config changes; a position in a list does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    App(&'a str),
    Tunnel(&'a str),
    /// An SSH target of the SSH front door.
    Ssh(&'a str),
}

/// Proof that policy allowed this request to this resource. Only `evaluate` can make one; the
/// proxy and the tunnel consume it.
#[derive(Debug)]
pub struct Permit<'a> {
    resource: Resource<'a>,
    _private: (),
}

impl<'a> Permit<'a> {
    /// What this permit was made for.
    pub fn resource(&self) -> Resource<'a> {
        self.resource
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
pub enum Decision<'a> {
    Allow(Permit<'a>),
    /// Sign in first; with `step_up`, the user is signed in but must add a second factor.
    Authenticate {
        step_up: bool,
    },
    Deny(DenyReason),
}

/// Who is asking: the identity of a live session, and whether that session was opened or
/// stepped up with a second factor.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub identity: &'a Identity,
    pub mfa: bool,
}

/// Decides whether `who` (None: no valid session) may use `resource`, declared with `access`,
/// which needs a second factor when `mfa_required`. Access rules are decided before the factor,
/// so a user is never asked for a factor for something they may not use.
pub fn evaluate<'a>(
    resource: Resource<'a>,
    access: &Access,
    mfa_required: bool,
    who: Option<Subject<'_>>,
) -> Decision<'a> {
    let allow = || Decision::Allow(Permit { resource, _private: () });
    let Some(who) = who else {
        return match access {
            Access::Public => allow(),
            _ => Decision::Authenticate { step_up: false },
        };
    };
    match access {
        Access::Public => return allow(),
        Access::Authenticated => {}
        Access::Rules(rules) => {
            if let Some(i) = rules.iter().position(|r| r.effect == Effect::Deny && matches(r, who.identity)) {
                return Decision::Deny(DenyReason::DenyRule(i));
            }
            if !rules.iter().any(|r| r.effect == Effect::Allow && matches(r, who.identity)) {
                return Decision::Deny(DenyReason::NoRuleMatched);
            }
        }
    }
    if mfa_required && !who.mfa { Decision::Authenticate { step_up: true } } else { allow() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(user: &str, groups: &[&str]) -> Identity {
        Identity { user: user.into(), email: None, groups: groups.iter().map(|g| g.to_string()).collect() }
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
            let subject = who.map(|identity| Subject { identity, mfa: false });
            assert_eq!(outcome(evaluate(Resource::App("seven"), access, false, subject)), want, "{access:?} {who:?}");
            // Requiring a second factor changes only the allows of password-only sessions.
            let with_mfa = who.map(|identity| Subject { identity, mfa: true });
            assert_eq!(
                outcome(evaluate(Resource::App("seven"), access, true, with_mfa)),
                want,
                "{access:?} {who:?} with mfa"
            );
            let expect = match (want, access, who) {
                ("allow", Access::Public, _) => "allow",
                ("allow", _, Some(_)) => "step up",
                (w, _, _) => w,
            };
            assert_eq!(
                outcome(evaluate(Resource::App("seven"), access, true, subject)),
                expect,
                "{access:?} {who:?} password only"
            );
        }
    }

    fn outcome(d: Decision) -> String {
        match d {
            Decision::Allow(p) => {
                assert_eq!(p.resource(), Resource::App("seven"));
                "allow".to_string()
            }
            Decision::Authenticate { step_up: false } => "login".to_string(),
            Decision::Authenticate { step_up: true } => "step up".to_string(),
            Decision::Deny(r) => r.to_string(),
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
            for mfa in [false, true] {
                let subject = Some(Subject { identity: &who, mfa });
                let d = evaluate(Resource::Tunnel("db"), &Access::Rules(rules.clone()), mfa, subject);
                proptest::prop_assert!(matches!(d, Decision::Deny(DenyReason::DenyRule(_))));
            }
        }
    }
}
