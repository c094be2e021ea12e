//! Who may reach an app or a tunnel, as the operator declared it. `policy::evaluate` decides
//! with it.

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
