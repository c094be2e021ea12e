//! What a WebSocket or tunnel holds open: a `Grant`, made from the policy permit that let it
//! open. It ends when the session does, and also when a config change takes the access away:
//! a reload asks `Grants::review` whether each open grant would still be allowed under the new
//! config, and cuts those that would not (an app or tunnel removed, a rule narrowed, a second
//! factor now required). The registry holds no strong reference, so a grant that closed on its
//! own is simply skipped and forgotten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::identity::Identity;
use crate::policy::{Permit, Resource};

use super::{Lifeline, Session};

/// The reason a grant gives when a reload took its access away.
pub const ACCESS_WITHDRAWN: &str = "access withdrawn by a config change";

/// What a grant was opened for, owned: the resource by name and by where it leads (a name
/// can be given to another app by the next config), the subject as it was.
#[derive(Debug)]
pub struct Held {
    pub app: Option<String>,
    pub tunnel: Option<String>,
    pub ssh: Option<String>,
    /// Where the connection goes: the app's upstream or the tunnel's target.
    pub dest: String,
    /// The session's identity and whether it had a second factor; None on a public app.
    pub subject: Option<(Identity, bool)>,
    cut: watch::Sender<Option<&'static str>>,
    /// The session's line, to tell a grant its session already ended.
    line: Option<Lifeline>,
}

impl Held {
    /// The resource, borrowed as policy takes it.
    pub fn resource(&self) -> Resource<'_> {
        match (&self.app, &self.tunnel, &self.ssh) {
            (Some(a), _, _) => Resource::App(a),
            (None, Some(t), _) => Resource::Tunnel(t),
            (None, None, Some(t)) => Resource::Ssh(t),
            (None, None, None) => unreachable!("invariant: a grant names an app, a tunnel or an SSH target"),
        }
    }
}

/// Every open grant of this process, by number.
#[derive(Debug, Default)]
pub struct Grants {
    next: AtomicU64,
    held: Mutex<HashMap<u64, Weak<Held>>>,
}

/// One open WebSocket or tunnel's hold on its access.
#[derive(Debug)]
pub struct Grant {
    held: Arc<Held>,
    line: Option<Lifeline>,
}

impl Grants {
    /// Registers a long-lived connection to `dest` opened under `permit` for `session`.
    pub fn hold(&self, permit: &Permit<'_>, session: Option<&Session>, dest: &str) -> Grant {
        let (mut app, mut tunnel, mut ssh) = (None, None, None);
        match permit.resource() {
            Resource::App(a) => app = Some(a.to_string()),
            Resource::Tunnel(t) => tunnel = Some(t.to_string()),
            Resource::Ssh(t) => ssh = Some(t.to_string()),
        }
        let held = Arc::new(Held {
            app,
            tunnel,
            ssh,
            subject: session.map(|s| (s.identity.clone(), s.mfa())),
            dest: dest.to_string(),
            cut: watch::channel(None).0,
            line: session.map(Session::lifeline),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut map = self.held.lock();
        // Forgets closed grants as it goes, so the map stays the size of what is open.
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        map.insert(id, Arc::downgrade(&held));
        Grant { held, line: session.map(Session::lifeline) }
    }

    /// Cuts every open grant `allowed` says no to; returns how many ended: cut now, or
    /// ended with their session already (a lockdown or a shorter timeout just before).
    pub fn review(&self, why: &'static str, allowed: impl Fn(&Held) -> bool) -> usize {
        let open: Vec<Arc<Held>> = {
            let mut map = self.held.lock();
            map.retain(|_, w| w.strong_count() > 0);
            map.values().filter_map(Weak::upgrade).collect()
        };
        let mut cut = 0;
        for h in open {
            if h.line.as_ref().is_some_and(|l| l.ended_now().is_some()) {
                cut += 1;
                continue;
            }
            if !allowed(&h)
                && h.cut.send_if_modified(|v| {
                    let first = v.is_none();
                    if first {
                        *v = Some(why);
                    }
                    first
                })
            {
                cut += 1;
            }
        }
        cut
    }

    /// Grants open now.
    pub fn open(&self) -> usize {
        self.held.lock().values().filter(|w| w.strong_count() > 0).count()
    }
}

impl Grant {
    /// Waits until the session ends or the access is withdrawn; says why.
    pub async fn ended(&self) -> &'static str {
        let mut rx = self.held.cut.subscribe();
        let withdrawn = async {
            loop {
                if let Some(why) = *rx.borrow_and_update() {
                    return why;
                }
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        match self.line.clone() {
            Some(line) => tokio::select! {
                why = line.ended() => why,
                why = withdrawn => why,
            },
            None => withdrawn.await,
        }
    }
}
