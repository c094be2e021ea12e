// The portal as a person uses it, in headless Chromium: open an app, get sent to sign in,
// sign in (a wrong password first), use the app, see the launcher and sessions, sign out.
//
// Environment: GATEWAY (https://localhost:PORT), ADMIN_PASSWORD, and optionally SHOTS, a
// folder for screenshots of each page.

import { createHmac } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { chromium } from "playwright-core";

const axeSource = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");

// What a phone authenticator app does, written independently of poort (RFC 6238).
function base32Decode(text) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = 0, value = 0;
  const out = [];
  for (const c of text.replace(/\s+/g, "")) {
    value = (value << 5) | alphabet.indexOf(c);
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}
function totp(secret, step) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(step));
  const h = createHmac("sha1", secret).update(counter).digest();
  const o = h[h.length - 1] & 0xf;
  const bin = ((h[o] & 0x7f) << 24) | (h[o + 1] << 16) | (h[o + 2] << 8) | h[o + 3];
  return String(bin % 1000000).padStart(6, "0");
}
const stepNow = () => Math.floor(Date.now() / 1000 / 30);

const gateway = process.env.GATEWAY;
const password = process.env.ADMIN_PASSWORD;
const shots = process.env.SHOTS;
if (!gateway || !password) {
  console.error("set GATEWAY and ADMIN_PASSWORD");
  process.exit(2);
}

let passed = 0;
let failed = 0;
/// `detail` may be a function, called only when the check fails (a lookup on the page that
/// would otherwise wait for an element that is, rightly, not there).
async function check(what, ok, detail = "") {
  if (typeof detail === "function") detail = ok ? "" : await detail();
  if (ok) {
    passed++;
    console.log(`ok - ${what}`);
  } else {
    failed++;
    console.log(`FAILED - ${what} ${detail}`);
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  const shot = async (name) => {
    if (shots) await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
  };
  // axe-core on the page as it is now. It is evaluated the way developer tools run a script,
  // which the page's Content-Security-Policy does not govern, so the pages are tested with
  // the policy they are served with.
  const a11y = async (name) => {
    if (!(await page.evaluate("!!window.axe"))) await page.evaluate(axeSource);
    const found = await page.evaluate(async () => {
      const r = await window.axe.run(document, { resultTypes: ["violations"] });
      return r.violations
        .filter((v) => v.impact === "serious" || v.impact === "critical")
        .map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).slice(0, 3).join(", ")}`);
    });
    check(`axe finds nothing serious on the ${name} page`, found.length === 0, found.join("; "));
  };

  await page.goto(`${gateway}/whoami/`);
  check("an app sends a signed-out browser to the login page", page.url().startsWith(`${gateway}/.poort/login?next=`), page.url());
  await shot("1-login");
  await a11y("login");

  await page.fill("#username", "admin");
  await page.fill("#password", "not the password at all");
  await page.click("button[type=submit]");
  const error = await page.locator("p.error").textContent().catch(() => "");
  check("a wrong password is refused with a plain message", error.includes("Wrong username or password"), error);
  await shot("2-login-failed");
  await a11y("login with an error");

  await page.fill("#password", password);
  await page.click("button[type=submit]");
  await page.waitForURL(`${gateway}/whoami/`);
  const whoami = await page.locator("body").innerText();
  check("after sign-in the browser is back at the app", page.url() === `${gateway}/whoami/`, page.url());
  check("the app receives who the user is", /x-poort-user: admin/i.test(whoami), whoami.slice(0, 400));
  check("the app receives a signed assertion", /x-poort-assertion: ey/i.test(whoami));
  check("the session cookie never reaches the app", !/__Host-poort/.test(whoami));
  check("the demo app shows who the user is first and folds the long token", whoami.indexOf('"sub":"admin"') > 0 && whoami.indexOf('"sub":"admin"') < whoami.indexOf("\nGET /") && /x-poort-assertion: ey\S{30}… \(\d+ characters\)/.test(whoami), whoami.slice(0, 600));
  await shot("3-app");

  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "__Host-poort");
  check("the session cookie is Secure, HttpOnly, SameSite=Lax", session && session.secure && session.httpOnly && session.sameSite === "Lax", JSON.stringify(session));

  await page.goto(`${gateway}/`);
  check("the launcher greets the user", (await page.locator("h1").textContent()) === "Your apps");
  const link = page.locator(`ul.apps a[href="${gateway}/whoami/"]`);
  check("the launcher lists the demo app", (await link.count()) === 1);
  check("and the one behind a second factor", (await page.locator(`ul.apps a[href="${gateway}/secure/"]`).count()) === 1);
  await shot("4-launcher");
  await link.click();
  await page.waitForURL(`${gateway}/whoami/`);
  check("the launcher opens the app", page.url() === `${gateway}/whoami/`);

  // An app behind a second factor: the user sets up an authenticator app on the way.
  await page.goto(`${gateway}/secure/`);
  check("an MFA app sends a user without a factor to set one up", page.url().startsWith(`${gateway}/.poort/security?next=`), page.url());
  const needs = await page.locator("p", { hasText: "needs a second factor" }).getAttribute("class").catch(() => "");
  check("the notice that a factor is needed is not in the success colour", needs === "attention", needs);
  await shot("6-security");
  // Just signed in and without a factor yet: the sign-in is the proof, no password again.
  check("a fresh sign-in may set up a first factor", (await page.locator("#pw-totp").count()) === 0);
  await page.click("button:has-text(\"Set up an authenticator app\")");
  check("the enrolment page shows a QR code", (await page.locator("img.qr").count()) === 1);
  const secret = base32Decode(await page.locator(".key code").textContent());
  check("the key is 160 bits", secret.length === 20);
  const shown = (await page.locator(".key code").textContent()).trim();
  const plain = await page.locator("#key-plain").inputValue();
  check("the key is offered as one string to copy", plain === shown.replace(/\s+/g, "") && /^[A-Z2-7]{32}$/.test(plain), `${shown} / ${plain}`);
  await page.setViewportSize({ width: 390, height: 844 });
  const lines = await page.evaluate(() => {
    // Where the key's lines break: each line must hold whole groups of four.
    const code = document.querySelector(".key code");
    const range = document.createRange();
    const text = code.firstChild;
    const tops = new Map();
    for (let i = 0; i < text.length; i++) {
      range.setStart(text, i);
      range.setEnd(text, i + 1);
      const top = Math.round(range.getBoundingClientRect().top);
      tops.set(top, (tops.get(top) || "") + text.data[i]);
    }
    return [...tops.values()].map((l) => l.trim());
  });
  check("on a phone the key breaks only between groups", lines.every((l) => l.split(" ").every((g) => g.length === 4)), JSON.stringify(lines));
  if (shots) await page.screenshot({ path: `${shots}/phone-enrol.png`, fullPage: true });
  await page.setViewportSize({ width: 1280, height: 800 });
  await shot("7-enrol");
  await a11y("authenticator enrolment");
  await page.fill("#code", totp(secret, stepNow()));
  await page.click("button:has-text(\"Confirm\")");
  const codes = await page.locator("ul.codes li").count();
  check("ten recovery codes are shown after enrolment", codes === 10, String(codes));
  await shot("8-recovery");
  await a11y("recovery codes");
  await page.click("text=I have saved them");
  await page.waitForURL(`${gateway}/secure/`);
  const secure = await page.locator("body").innerText();
  check("after enrolment the MFA app opens", /x-poort-user: admin/i.test(secure));
  check("its assertion records the second factor", /"amr":\["pwd","otp"\]/.test(secure), secure.slice(-300));

  // A passkey, made by Chromium's virtual authenticator (a real WebAuthn ceremony).
  const cdp = await context.newCDPSession(page);
  await cdp.send("WebAuthn.enable");
  await cdp.send("WebAuthn.addVirtualAuthenticator", {
    options: {
      protocol: "ctap2",
      transport: "internal",
      hasResidentKey: true,
      hasUserVerification: true,
      isUserVerified: true,
      automaticPresenceSimulation: true,
    },
  });
  await page.goto(`${gateway}/.poort/security`);
  check("the security page asks for no password on its own forms", (await page.locator("input[type=password]").count()) === 0);
  // The authenticator code given a moment ago is a fresh second factor: changes are open.
  await page.fill("#pk-name", "laptop");
  await page.click("button:has-text(\"Add a passkey\")");
  await page.waitForURL(`${gateway}/.poort/security/passkey/start`);
  check("adding a passkey starts with the person's own form post", (await page.locator("button[data-passkey-create]").count()) === 1);
  await a11y("add a passkey");
  await page.click("button:has-text(\"Create the passkey\")");
  await page.waitForURL(`${gateway}/.poort/security`, { timeout: 10000 }).catch(() => {});
  await page.waitForSelector("td:has-text(\"laptop\")", { timeout: 10000 }).catch(() => {});
  await check("a passkey can be added and named", (await page.locator("td", { hasText: "laptop" }).count()) === 1, () => page.locator("#passkey-status").textContent({ timeout: 2000 }).catch(() => ""));
  await shot("10-passkey");
  // The same authenticator again: it holds a passkey for this account already, and the
  // person reads why in a sentence, not the browser's error with a specification's address.
  await page.fill("#pk-name", "again");
  await page.click("button:has-text(\"Add a passkey\")");
  await page.waitForURL(`${gateway}/.poort/security/passkey/start`);
  await page.click("button:has-text(\"Create the passkey\")");
  await page.waitForFunction(() => !/Follow your browser/.test(document.querySelector("#passkey-status").textContent), null, { timeout: 10000 }).catch(() => {});
  const failure = await page.locator("#passkey-status").textContent();
  check("a passkey that fails says why in a sentence", /already holds a passkey/.test(failure) && !/w3\.org|https?:/.test(failure), failure);

  await page.goto(`${gateway}/.poort/sessions`);
  const rows = page.locator("table").first().locator("tbody tr");
  check("my sessions lists this session", (await rows.count()) === 1 && (await rows.first().innerText()).includes("this session"));
  check("my sessions names browser and system, not a cut-off user agent", /Chrome(ium)? on Linux/.test(await rows.first().innerText()), await rows.first().innerText());
  const changes = await page.locator("table").nth(1).innerText().catch(() => "");
  check("the sessions page shows the first factor set up with the password alone", /authenticator app set up/.test(changes) && /with the password alone/.test(changes), changes);
  await shot("5-sessions");

  // A script on the demo app's page (routed by path, so on the portal's own origin) opens a
  // portal page in a window to read it (a new authenticator's secret, a form's token): the
  // portal page cuts the window off from its opener.
  await page.goto(`${gateway}/whoami/`);
  const reach = await page.evaluate(async (url) => {
    const w = window.open(url, "probe");
    for (let i = 0; i < 50; i++) {
      await new Promise((r) => setTimeout(r, 100));
      try {
        if (!w || w.closed) return "cut off";
        if (w.document.querySelector("h1")) return `read: ${w.document.title}`;
      } catch (e) {
        return `cut off (${e.name})`;
      }
    }
    return "no answer";
  }, `${gateway}/.poort/security`);
  check("an app's script cannot read a portal page it opened", reach.startsWith("cut off"), reach);
  for (const p of context.pages()) if (p !== page) await p.close();
  await page.goto(`${gateway}/.poort/sessions`);

  await page.click("button.link");
  await page.waitForURL(`${gateway}/.poort/login`);
  check("sign out goes back to the login page", page.url() === `${gateway}/.poort/login`);
  await page.goto(`${gateway}/whoami/`);
  check("after sign-out the app asks for sign-in again", page.url().startsWith(`${gateway}/.poort/login`));

  // Back in: a password-only session is asked for the code when it opens the MFA app.
  await page.fill("#username", "admin");
  await page.fill("#password", password);
  await page.click("button[type=submit]");
  await page.waitForURL(`${gateway}/whoami/`);
  check("the plain app needs only the password", /x-poort-user: admin/i.test(await page.locator("body").innerText()));
  await page.goto(`${gateway}/secure/`);
  check("the MFA app asks a password-only session for the code", page.url().startsWith(`${gateway}/.poort/mfa?next=`), page.url());
  check("the code prompt has a way to sign out", (await page.locator("button:has-text(\"Sign out\")").count()) === 1);
  await shot("9-step-up");
  await a11y("second factor prompt");
  // The code of the step just used at enrolment would be a replay; the next one is within
  // the accepted drift, as a phone a few seconds ahead would show it.
  await page.fill("#code", totp(secret, stepNow() + 1));
  await page.click("button:has-text(\"Continue\")");
  await page.waitForURL(`${gateway}/secure/`);
  check("with the code, the MFA app opens", /x-poort-user: admin/i.test(await page.locator("body").innerText()));

  // Passwordless: sign out, then sign in with the passkey alone; it counts as two factors.
  await page.goto(`${gateway}/`);
  await page.click("button.link");
  await page.waitForURL(`${gateway}/.poort/login`);
  await page.click("button:has-text(\"Sign in with a passkey\")");
  await page.waitForURL(`${gateway}/`, { timeout: 10000 }).catch(() => {});
  await check("a passkey signs in without a password", page.url() === `${gateway}/`, async () => page.url() + " " + (await page.locator("#passkey-status").textContent({ timeout: 2000 }).catch(() => "")));
  await page.goto(`${gateway}/secure/`);
  const pl = await page.locator("body").innerText();
  check("a passkey sign-in opens the MFA app without another prompt", page.url() === `${gateway}/secure/` && /"amr":\["hwk","mfa"\]/.test(pl), page.url());

  // The admin console: the quickstart's admin is in group admins, and this session was
  // opened with a passkey (a second factor).
  await page.goto(`${gateway}/`);
  await page.click("a:has-text(\"Admin console\")");
  await page.waitForURL(`${gateway}/.poort/admin`);
  check("an administrator with a second factor opens the console from the launcher", (await page.locator("h1").textContent()) === "Administration", page.url());
  await page.goto(`${gateway}/.poort/admin`);
  check("and from the address bar", (await page.locator("h1").textContent()) === "Administration", page.url());
  await page.click("nav.sub a:has-text(\"Users\")");
  await page.waitForURL(`${gateway}/.poort/admin/users`);
  check("the users page lists the administrator", (await page.locator("td a", { hasText: "admin" }).count()) === 1);
  await page.fill("#new-name", "carol");
  await page.fill("#new-groups", "staff");
  await page.click("button:has-text(\"Add user\")");
  const added = await page.locator("p.notice").allTextContents();
  check("a user added in the console gets a password shown once", added.some((t) => t.includes("Added user carol")) && added.some((t) => /shown only this once: \S{20}/.test(t)), added.join(" | "));
  await shot("11-admin-users");
  await page.click("nav.sub a:has-text(\"Sessions\")");
  await page.waitForURL(`${gateway}/.poort/admin/sessions`);
  const mine = await page.locator("tbody tr", { hasText: "yours" }).innerText().catch(() => "");
  check("the console's sessions page names browser and system", /Chrome(ium)? on Linux/.test(mine), mine);
  await shot("12-admin-sessions");
  // A script on the demo app's page (the portal's origin) cannot read the console.
  await page.goto(`${gateway}/whoami/`);
  const scripted = await page.evaluate(async () => {
    const r = await fetch("/.poort/admin/users", { credentials: "include" });
    return `${r.status} ${(await r.text()).includes("carol") ? "read" : "nothing"}`;
  });
  check("an app's script gets nothing from the console", scripted === "403 nothing", scripted);

  // SSH in the browser: scripts/browser-test adds a target, this machine's own sshd.
  const target = process.env.SSH_TARGET;
  if (target) {
    const inBuffer = (text) => {
      const t = window.poortTerminal;
      if (!t) return false;
      const b = t.buffer.active;
      for (let i = 0; i < b.length; i++) if ((b.getLine(i)?.translateToString() || "").includes(text)) return true;
      return false;
    };
    await page.goto(`${gateway}/`);
    await page.click(`a[href="/.poort/ssh/${target}"]`);
    await page.waitForURL(`${gateway}/.poort/ssh/${target}`);
    const connected = await page.waitForFunction(() => document.getElementById("term-status")?.textContent === "Connected.", null, { timeout: 15000 }).then(() => true, () => false);
    await check("the launcher opens an SSH target in the browser", connected, () => page.locator("#term-status").textContent());
    await page.locator("#term").click();
    await page.keyboard.type("echo browser-$((40+2))");
    await page.keyboard.press("Enter");
    const ran = await page.waitForFunction(inBuffer, "browser-42", { timeout: 15000 }).then(() => true, () => false);
    check("a command typed in the browser terminal runs on the target", ran);
    await shot("13-ssh-terminal");
    await page.keyboard.type("exit");
    await page.keyboard.press("Enter");
    const closed = await page.waitForFunction(() => document.body.dataset.closed === "yes", null, { timeout: 15000 }).then(() => true, () => false);
    check("exiting the shell closes the terminal and says so", closed && /Disconnected/.test(await page.locator("#term-status").textContent()));
    // The administrator replays it from the console.
    await page.goto(`${gateway}/.poort/admin`);
    await page.click("nav.sub a:has-text(\"Recordings\")");
    await page.waitForURL(`${gateway}/.poort/admin/recordings`);
    await page.click("a:has-text(\"Replay\")");
    await page.waitForURL(/\/\.poort\/admin\/recording\?seq=/);
    await page.click("#term-skip");
    const replayed = await page.waitForFunction(inBuffer, "browser-42", { timeout: 15000 }).then(() => true, () => false);
    check("the console replays the browser session", replayed);
    await shot("14-admin-replay");
  }

  // Every signed-in page, for the phone and accessibility checks below.
  const pages = [
    ["launcher", "/"],
    ["sessions", "/.poort/sessions"],
    ["security", "/.poort/security"],
    ["confirm", "/.poort/confirm"],
    ["command-line approval", "/.poort/device"],
    ["admin overview", "/.poort/admin"],
    ["admin users", "/.poort/admin/users"],
    ["admin user", "/.poort/admin/user?name=carol"],
    ["admin sessions", "/.poort/admin/sessions"],
    ["admin audit", "/.poort/admin/audit"],
    ["admin mitigation", "/.poort/admin/mitigation"],
    ["admin access", "/.poort/admin/access?user=carol"],
    ["admin report", "/.poort/admin/report"],
    ["admin recordings", "/.poort/admin/recordings"],
  ];

  // On a phone: nothing leaves the screen sideways, and sign out stays in reach.
  await page.setViewportSize({ width: 390, height: 844 });
  for (const [name, path] of pages) {
    await page.goto(`${gateway}${path}`);
    const fits = await page.evaluate(() => {
      const out = document.querySelector("button.link");
      const r = out ? out.getBoundingClientRect() : { right: 0 };
      return { scroll: document.documentElement.scrollWidth, signOut: Math.round(r.right) };
    });
    check(`on a 390 px screen the ${name} page fits and sign out is on screen`, fits.scroll <= 390 && fits.signOut > 0 && fits.signOut <= 390, JSON.stringify(fits));
    if (shots) {
      const file = name.replaceAll(" ", "-");
      await page.screenshot({ path: `${shots}/phone-${file}.png`, fullPage: true });
      await page.setViewportSize({ width: 1280, height: 800 });
      await page.screenshot({ path: `${shots}/wide-${file}.png`, fullPage: true });
      await page.setViewportSize({ width: 390, height: 844 });
    }
  }
  await page.setViewportSize({ width: 1280, height: 800 });

  // Accessibility: axe-core on every portal and admin page (the pages met on the way were
  // checked there, by `a11y`), signed out and signed in: nothing serious or critical.
  for (const [name, path] of [...pages, ["error", "/.poort/no-such-page"]]) {
    await page.goto(`${gateway}${path}`);
    await a11y(name);
  }
} finally {
  await browser.close();
}

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
