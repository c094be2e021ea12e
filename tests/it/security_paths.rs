//! Path confusion and traversal, in the shape of the public exploits against gateways:
//! every target is refused (or routed to nothing) and no upstream sees a request.

use crate::harness::Gate;

/// (target, what it imitates). Each must be refused with 400 or find nothing (404), and the
/// upstream must receive nothing, even with a valid session.
const CASES: &[(&str, &str)] = &[
    ("/vpn/../vpns/cfg/smb.conf", "Citrix CVE-2019-19781"),
    ("/vpn/../vpns/portal/scripts/newbm.pl", "Citrix CVE-2019-19781 template write"),
    ("/vpn/%2e%2e/vpns/cfg/smb.conf", "CVE-2019-19781, encoded"),
    (
        "/dana-na/../dana/html5acc/guacamole/../../../../../../etc/passwd?/dana/html5acc/guacamole/",
        "Pulse CVE-2019-11510",
    ),
    ("/tmui/login.jsp/..;/tmui/locallb/workspace/fileRead.jsp", "F5 CVE-2020-5902"),
    ("/tmui/login.jsp/%2e%2e;/tmui/system/user/authproperties.jsp", "F5 CVE-2020-5902, encoded"),
    ("/%2577ebui_wsma_HTTP", "Cisco CVE-2023-20198"),
    ("/unauth/%252e%252e/php/ztp_gate.php/PAN_help/x.css", "PAN-OS CVE-2025-0108"),
    (
        "/api/v1/totp/user-backup-code/../../system/maintenance/archiving/cloud-server-test-connection",
        "Ivanti CVE-2023-46805",
    ),
    ("/api/v1/totp/user-backup-code/%2e%2e/%2e%2e/license/keys-status/x", "Ivanti CVE-2024-21887 chain"),
    (
        "/remote/fgt_lang?lang=/../../../..//////////dev/cmdb/sslvpn_websession",
        "FortiOS CVE-2018-13379 (path in lang=)",
    ),
    ("/app/..%2f..%2fstaff/", "encoded slash traversal"),
    ("/app/%2e%2e/staff/", "encoded dot-dot into another app"),
    ("/app/%2E%2E/staff/", "upper-case encoded dot-dot"),
    ("/app/.%2e/staff/", "half-encoded dot-dot"),
    ("/app/%2e./staff/", "half-encoded dot-dot, other half"),
    ("/app/./../staff/", "dot then dot-dot"),
    ("/app/..\\staff/", "backslash traversal"),
    ("/app/%5c..%5cstaff/", "encoded backslash traversal"),
    ("/app/..%5cstaff/", "mixed backslash"),
    ("/app/%252e%252e/staff/", "double-encoded dot-dot"),
    ("/app/%25252e%25252e/staff/", "triple-encoded dot-dot"),
    ("/app/%c0%ae%c0%ae/staff/", "overlong UTF-8 dot-dot"),
    ("/app/%e0%80%ae%e0%80%ae/staff/", "three-byte overlong dot"),
    ("/app/%c0%af../staff/", "overlong slash"),
    ("/app/..;/staff/", "Tomcat path parameter"),
    ("/app;/staff/", "parameter on the prefix"),
    ("/app/;jsessionid=x/../staff/", "session id parameter"),
    ("/app/%3b/../staff/", "encoded semicolon"),
    ("/app/x%00.html", "NUL truncation"),
    ("/app/x%00/../../staff/", "NUL then traversal"),
    ("/app/x%0d%0aX-Poort-User:%20admin", "CRLF injection in the path"),
    ("/app/x%09y", "tab in the path"),
    ("//staff/", "empty first segment"),
    ("/app//../staff/", "empty segment then dot-dot"),
    ("/.poort/../staff/", "traversal out of the portal prefix"),
    ("/.poort/%2e%2e/staff/", "encoded traversal out of the portal prefix"),
    ("/.poort%2f../staff/", "Pomerium CVE-2023-33189 (the proxy's own prefix, encoded)"),
    ("/%2epoort/../staff/", "the portal prefix with an encoded dot"),
    ("/app/%u002e%u002e/staff/", "IIS %u encoding"),
    ("/app/%%32%65%%32%65/staff/", "nested percent encoding"),
    ("/app/%2/x", "truncated escape"),
    ("/app/%zz/x", "non-hex escape"),
    ("/app/\u{ff0e}\u{ff0e}/staff/", "full-width dots, raw"),
];

#[tokio::test]
async fn traversal_in_the_shape_of_public_exploits_reaches_nobody() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let before = gate.audit("request_rejected").len();
    let mut refused = 0;
    for (target, what) in CASES {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nConnection: close\r\n\r\n"
        );
        let (status, hits) = gate.hostile(req.as_bytes()).await;
        assert!(matches!(status, Some(400) | Some(404) | None), "{what}: {target} got {status:?}");
        assert_eq!(hits, 0, "{what}: {target} reached the upstream");
        if status == Some(400) {
            refused += 1;
        }
    }
    // Every refusal is accounted for in the audit log (the first of a kind in a minute on its
    // own, the rest counted).
    let audited = gate.refusals("request_rejected").await - before as u64;
    assert_eq!(audited, refused as u64, "{audited} audited of {refused} refused");
}

/// What an accepted but unusual target becomes: the upstream sees exactly the canonical form.
#[tokio::test]
async fn accepted_targets_reach_the_upstream_in_canonical_form() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let cases = [
        ("/app/a%41b", "/aAb"),
        ("/APP/x", "/x"),
        ("/app/caf%C3%A9", "/caf%C3%A9"),
        ("/app/caf%c3%a9", "/caf%C3%A9"),
        ("/app/a+b", "/a+b"),
        ("/app/a%20b?q=%2e%2e/x", "/a%20b?q=%2e%2e/x"),
        ("/app/~user/", "/~user/"),
        ("/app/x.y..z", "/x.y..z"),
    ];
    for (target, upstream) in cases {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nConnection: close\r\n\r\n"
        );
        let (status, hits) = gate.hostile(req.as_bytes()).await;
        assert_eq!((status, hits), (Some(200), 1), "{target}");
        assert_eq!(gate.upstream.last().target, upstream, "{target}");
    }
}

/// An app whose prefix is stripped gets the path after the prefix's segments, however the
/// prefix was spelled: letters that fold to ASCII (longer in UTF-8 than the letter they match)
/// and dots and spaces at the end of the segment neither crash the gateway nor leak into the
/// upstream's path. Before login too, on a public app.
#[tokio::test]
async fn a_stripped_prefix_is_removed_whatever_its_spelling() {
    let tables = "\n[[app]]\nname = \"kiosk\"\nupstream = \"http://{up}/base\"\npath = \"/kiosk/\"\nstrip_prefix = true\naccess = \"public\"\n";
    let gate = Gate::start_config("", tables).await;
    for target in
        ["/kiosk/x", "/KIOSK/x", "/kios%E2%84%AA/x", "/k%C4%B1osk/x", "/kiosk./x", "/kiosk%20/x", "/Kiosk.%20./x"]
    {
        let req = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let (status, hits) = gate.hostile(req.as_bytes()).await;
        assert_eq!((status, hits), (Some(200), 1), "{target}");
        assert_eq!(gate.upstream.last().target, "/base/x", "{target}");
    }
}

/// Policy decides on the path only, never on the query (oauth2-proxy CVE-2025-54576).
#[tokio::test]
async fn the_query_never_opens_a_protected_path() {
    let gate = Gate::start().await;
    for target in ["/app/?x=/pub/", "/app/?/pub/", "/staff/?next=/pub/x", "/app/#/pub/", "/app/%3f/pub/"] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let (status, hits) = gate.hostile(req.as_bytes()).await;
        assert!(matches!(status, Some(400) | Some(401)), "{target}: {status:?}");
        assert_eq!(hits, 0, "{target}");
    }
}
