// poort's only script: the WebAuthn ceremonies (passkeys and security keys). Every form on
// the portal works without it; it runs only where a page has a [data-passkey] element.
"use strict";

(function () {
  const root = document.querySelector("[data-passkey]");
  if (!root) return;
  const csrf = root.dataset.csrf;
  const next = root.dataset.next || "";
  const device = root.dataset.device || "";
  const status = document.getElementById("passkey-status");

  const toBytes = (s) => {
    const b64 = s.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((s.length + 3) % 4);
    return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  };
  const toText = (buf) =>
    btoa(String.fromCharCode(...new Uint8Array(buf))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  const say = (msg) => { if (status) status.textContent = msg; };

  async function post(url, body) {
    const r = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Poort-CSRF": csrf },
      body: JSON.stringify(body),
    });
    const j = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(j.error || "the request failed");
    return j;
  }

  function requestOptions(options) {
    const pk = options.publicKey;
    pk.challenge = toBytes(pk.challenge);
    (pk.allowCredentials || []).forEach((c) => { c.id = toBytes(c.id); });
    return options;
  }

  function assertion(cred) {
    return {
      id: cred.id,
      rawId: toText(cred.rawId),
      type: cred.type,
      response: {
        authenticatorData: toText(cred.response.authenticatorData),
        clientDataJSON: toText(cred.response.clientDataJSON),
        signature: toText(cred.response.signature),
        userHandle: cred.response.userHandle ? toText(cred.response.userHandle) : null,
      },
      extensions: cred.getClientExtensionResults ? cred.getClientExtensionResults() : {},
    };
  }

  function finished(done) {
    if (done.recovery_codes && done.recovery_codes.length) {
      const list = document.getElementById("passkey-codes");
      if (list) {
        list.hidden = false;
        list.querySelector("ul").innerHTML = "";
        done.recovery_codes.forEach((c) => {
          const li = document.createElement("li");
          const code = document.createElement("code");
          code.textContent = c;
          li.appendChild(code);
          list.querySelector("ul").appendChild(li);
        });
        const go = list.querySelector("a");
        go.href = done.redirect;
        say("Passkey added.");
        return;
      }
    }
    window.location.assign(done.redirect);
  }

  // The registration was started by the form on the security page (a person's own
  // navigation); this page carries its options, and the script only creates and sends.
  async function register() {
    const options = JSON.parse(root.dataset.options);
    const pk = options.publicKey;
    pk.challenge = toBytes(pk.challenge);
    pk.user.id = toBytes(pk.user.id);
    (pk.excludeCredentials || []).forEach((c) => { c.id = toBytes(c.id); });
    const cred = await navigator.credentials.create(options);
    const credential = {
      id: cred.id,
      rawId: toText(cred.rawId),
      type: cred.type,
      response: {
        attestationObject: toText(cred.response.attestationObject),
        clientDataJSON: toText(cred.response.clientDataJSON),
        transports: cred.response.getTransports ? cred.response.getTransports() : undefined,
      },
      extensions: cred.getClientExtensionResults ? cred.getClientExtensionResults() : {},
    };
    finished(await post("/.poort/security/passkey/finish", { ceremony: root.dataset.ceremony, credential }));
  }

  async function authenticate(kind) {
    const base = kind === "login" ? "/.poort/login/passkey" : "/.poort/mfa/passkey";
    const start = await post(base + "/start", kind === "login" ? { next } : { next, device });
    const cred = await navigator.credentials.get(requestOptions(start.options));
    finished(await post(base + "/finish", { ceremony: start.ceremony, credential: assertion(cred) }));
  }

  // What went wrong, in words a person can act on; the browser's own message names
  // specifications and is not for them.
  function plain(err) {
    switch (err && err.name) {
      case "NotAllowedError":
        return "The passkey prompt was closed or timed out. Try again when you are ready.";
      case "InvalidStateError":
        return "This device or key already holds a passkey for your account here.";
      case "AbortError":
        return "The passkey prompt was cancelled. Try again.";
      case "SecurityError":
        return "The browser refused to use a passkey for this address.";
      case "NotSupportedError":
        return "This device or key cannot make a passkey of the kind needed here.";
      default:
        // Our own errors (the gateway's answers) are already sentences.
        return err instanceof DOMException || !err ? "The passkey did not work. Try again, or use another way to sign in." : err.message;
    }
  }

  if (!window.PublicKeyCredential) {
    say("This browser does not support passkeys.");
    return;
  }
  root.hidden = false;
  root.querySelectorAll("button[data-passkey-create]").forEach((button) => {
    button.addEventListener("click", (e) => {
      e.preventDefault();
      say("Follow your browser's prompt…");
      register().catch((err) => say(plain(err)));
    });
  });
  root.querySelectorAll("button[data-passkey-auth]").forEach((button) => {
    button.addEventListener("click", (e) => {
      e.preventDefault();
      say("Follow your browser's prompt…");
      authenticate(button.dataset.passkeyAuth).catch((err) => say(plain(err)));
    });
  });
})();
