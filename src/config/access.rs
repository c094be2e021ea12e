//! Who may reach an app or a tunnel, as the operator declared it. `policy::evaluate` decides
//! with it. `resolve_access` reads it from the file.

use super::resolve::Collector;

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

pub(super) fn resolve_access(c: &mut Collector, key: &str, v: toml::Value) -> Option<Access> {
    let path = format!("{key}.access");
    match v {
        toml::Value::String(s) => match s.as_str() {
            "public" => Some(Access::Public),
            "authenticated" => Some(Access::Authenticated),
            other => {
                c.add(
                    path,
                    format!("{other:?} is not an access mode"),
                    "\"authenticated\", \"public\" or { rules = [...] }",
                );
                None
            }
        },
        toml::Value::Table(mut t) => {
            let rules = t.remove("rules");
            if let Some(k) = t.keys().next() {
                c.add(format!("{path}.{k}"), "unknown key", "the access table takes only rules = [...]");
                return None;
            }
            let Some(toml::Value::Array(rules)) = rules else {
                c.add(
                    format!("{path}.rules"),
                    "missing or not a list",
                    "rules = [{ effect = \"allow\", groups = [\"staff\"] }]",
                );
                return None;
            };
            let mut out = Vec::new();
            let mut ok = true;
            for (i, r) in rules.into_iter().enumerate() {
                match resolve_rule(c, &format!("{path}.rules[{i}]"), r) {
                    Some(r) => out.push(r),
                    None => ok = false,
                }
            }
            if out.is_empty() && ok {
                c.add(format!("{path}.rules"), "is empty, so nobody could use the app", "add an allow rule");
                return None;
            }
            ok.then_some(Access::Rules(out))
        }
        _ => {
            c.add(path, "must be a string or a table", "\"authenticated\", \"public\" or { rules = [...] }");
            None
        }
    }
}

fn resolve_rule(c: &mut Collector, path: &str, v: toml::Value) -> Option<Rule> {
    let toml::Value::Table(mut t) = v else {
        c.add(path, "a rule must be a table", "{ effect = \"allow\", groups = [\"staff\"] }");
        return None;
    };
    let strings = |c: &mut Collector, k: &str, t: &mut toml::Table| -> Option<Vec<String>> {
        match t.remove(k) {
            None => Some(Vec::new()),
            Some(toml::Value::Array(a)) => {
                let v: Option<Vec<String>> = a.into_iter().map(|x| x.as_str().map(str::to_string)).collect();
                if v.is_none() {
                    c.add(format!("{path}.{k}"), "must be a list of strings", format!("{k} = [\"name\"]"));
                }
                v
            }
            Some(_) => {
                c.add(format!("{path}.{k}"), "must be a list of strings", format!("{k} = [\"name\"]"));
                None
            }
        }
    };
    let users = strings(c, "users", &mut t);
    let groups = strings(c, "groups", &mut t);
    let effect = match t.remove("effect") {
        Some(toml::Value::String(s)) if s == "allow" => Some(Effect::Allow),
        Some(toml::Value::String(s)) if s == "deny" => Some(Effect::Deny),
        _ => {
            c.add(
                format!("{path}.effect"),
                "missing or not \"allow\"/\"deny\"",
                "effect = \"allow\" or effect = \"deny\"",
            );
            None
        }
    };
    if let Some(k) = t.keys().next() {
        c.add(format!("{path}.{k}"), "unknown key", "a rule takes effect, users and groups");
        return None;
    }
    let (users, groups, effect) = (users?, groups?, effect?);
    if users.is_empty() && groups.is_empty() {
        c.add(path, "matches nobody", "name at least one user or group");
        return None;
    }
    Some(Rule { effect, users, groups })
}
