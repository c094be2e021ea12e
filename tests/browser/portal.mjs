// The portal as a person uses it, in headless Chromium: open an app, get sent to sign in,
// sign in (a wrong password first), use the app, see the launcher and sessions, sign out.
//
// Environment: GATEWAY (https://localhost:PORT), ADMIN_PASSWORD, and optionally SHOTS, a
// folder for screenshots of each page.

import { chromium } from "playwright-core";

const gateway = process.env.GATEWAY;
const password = process.env.ADMIN_PASSWORD;
const shots = process.env.SHOTS;
if (!gateway || !password) {
  console.error("set GATEWAY and ADMIN_PASSWORD");
  process.exit(2);
}

let passed = 0;
let failed = 0;
function check(what, ok, detail = "") {
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

  await page.goto(`${gateway}/whoami/`);
  check("an app sends a signed-out browser to the login page", page.url().startsWith(`${gateway}/.poort/login?next=`), page.url());
  await shot("1-login");

  await page.fill("#username", "admin");
  await page.fill("#password", "not the password at all");
  await page.click("button[type=submit]");
  const error = await page.locator("p.error").textContent().catch(() => "");
  check("a wrong password is refused with a plain message", error.includes("Wrong username or password"), error);
  await shot("2-login-failed");

  await page.fill("#password", password);
  await page.click("button[type=submit]");
  await page.waitForURL(`${gateway}/whoami/`);
  const whoami = await page.locator("body").innerText();
  check("after sign-in the browser is back at the app", page.url() === `${gateway}/whoami/`, page.url());
  check("the app receives who the user is", /x-poort-user: admin/i.test(whoami), whoami.slice(0, 400));
  check("the app receives a signed assertion", /x-poort-assertion: ey/i.test(whoami));
  check("the session cookie never reaches the app", !/__Host-poort/.test(whoami));
  await shot("3-app");

  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "__Host-poort");
  check("the session cookie is Secure, HttpOnly, SameSite=Lax", session && session.secure && session.httpOnly && session.sameSite === "Lax", JSON.stringify(session));

  await page.goto(`${gateway}/`);
  check("the launcher greets the user", (await page.locator("h1").textContent()) === "Your apps");
  const link = page.locator("ul.apps a", { hasText: "Who am I" });
  check("the launcher lists the demo app", (await link.count()) === 1);
  await shot("4-launcher");
  await link.click();
  await page.waitForURL(`${gateway}/whoami/`);
  check("the launcher opens the app", page.url() === `${gateway}/whoami/`);

  await page.goto(`${gateway}/.poort/sessions`);
  const rows = page.locator("tbody tr");
  check("my sessions lists this session", (await rows.count()) === 1 && (await rows.first().innerText()).includes("this session"));
  await shot("5-sessions");

  await page.click("button.link");
  await page.waitForURL(`${gateway}/.poort/login`);
  check("sign out goes back to the login page", page.url() === `${gateway}/.poort/login`);
  await page.goto(`${gateway}/whoami/`);
  check("after sign-out the app asks for sign-in again", page.url().startsWith(`${gateway}/.poort/login`));
} finally {
  await browser.close();
}

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
