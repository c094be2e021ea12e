// A real OpenID Provider (npm oidc-provider) for poort's single sign-on tests, on loopback.
//
//   node provider.mjs PORT REDIRECT_URI POST_LOGOUT_REDIRECT_URI
//
// One client, "poort" (secret "poort-client-secret"), with PKCE required. There is no login
// page: an interaction signs in the account chosen through the control endpoint, so that tests
// can run the whole authorization code flow without a browser. The control endpoint can also
// make the token endpoint misbehave, to prove poort refuses what a broken or hostile provider
// might send:
//
//   POST /test/control {"account": "grace", "amr": ["pwd", "otp"], "acr": "...", "tamper": null}
//
// tamper: "signature" (a flipped signature byte), "nonce", "audience", "expired" or "issuer"
// (the ID token re-signed with the provider's own key after the change), or "rotated" (signed
// with a second key; with "rotate": true the provider also starts publishing it).
import http from 'node:http';
import * as jose from 'jose';
import Provider from 'oidc-provider';

const [port, redirectUri, postLogoutUri] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;

const { privateKey, publicKey } = await jose.generateKeyPair('RS256', { extractable: true });
const signingKey = { ...(await jose.exportJWK(privateKey)), kid: 'poort-test', alg: 'RS256', use: 'sig' };
// A second key the provider "rotates" to: published only after a rotation (POST control
// {"rotate": true}), and used by the tamper mode "rotated".
const rotated = await jose.generateKeyPair('RS256', { extractable: true });
const publicJwks = async (withRotated) => {
  const keys = [{ ...(await jose.exportJWK(publicKey)), kid: 'poort-test', alg: 'RS256', use: 'sig' }];
  if (withRotated) keys.push({ ...(await jose.exportJWK(rotated.publicKey)), kid: 'poort-test-2', alg: 'RS256', use: 'sig' });
  return { keys };
};
let isRotated = false;

const accounts = {
  grace: {
    sub: 'grace-0001', preferred_username: 'grace', email: 'grace@example.org', email_verified: true,
    groups: ['engineering', 'Remote Staff'],
  },
  heidi: {
    sub: 'heidi-0002', preferred_username: 'heidi', email: 'heidi@elsewhere.example', email_verified: true,
    groups: ['contractors'],
  },
  ivan: {
    sub: 'ivan-0003', preferred_username: 'ivan', email: 'ivan@example.org', email_verified: true,
    groups: ['contractors'],
  },
  // Another account that chose grace's name in capitals.
  impostor: {
    sub: 'impostor-0004', preferred_username: 'GRACE', email: 'mallory@example.org', email_verified: true,
    groups: ['engineering'],
  },
  // A name with U+212A KELVIN SIGN, which a Unicode fold turns into "k".
  kelvin: {
    sub: 'kelvin-0005', preferred_username: 'ja\u212Ae', email: 'jake@example.org', email_verified: true,
    groups: [],
  },
  // A provider account with the name of a directory user.
  dave: {
    sub: 'dave-0006', preferred_username: 'dave', email: 'dave@elsewhere.example', email_verified: true,
    groups: [],
  },
};
const bySub = Object.fromEntries(Object.values(accounts).map((a) => [a.sub, a]));
let control = { account: 'grace', amr: ['pwd'], acr: undefined, tamper: null };

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'poort',
    client_secret: 'poort-client-secret',
    redirect_uris: [redirectUri],
    post_logout_redirect_uris: [postLogoutUri],
    response_types: ['code'],
    grant_types: ['authorization_code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  jwks: { keys: [signingKey] },
  pkce: { required: () => true },
  scopes: ['openid', 'email', 'profile', 'groups', 'offline_access'],
  claims: {
    acr: null, amr: null, auth_time: null, sid: null, iss: null,
    // How the user authenticated goes into every ID token, as Entra ID and Keycloak do.
    openid: ['sub', 'acr', 'amr', 'auth_time'],
    email: ['email', 'email_verified'],
    profile: ['preferred_username'],
    groups: ['groups'],
  },
  // All granted claims in the ID token, as Entra ID and Keycloak can be set up to do.
  conformIdTokenClaims: false,
  findAccount: async (ctx, sub) => {
    const a = bySub[sub];
    return a && { accountId: sub, claims: async () => a };
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: {
      enabled: true,
      // No confirmation page: the logout form submits itself, as a browser would.
      logoutSource: async (ctx, form) => {
        ctx.body = `<!doctype html><html><body>${form}<script>document.forms[0].submit()</script></body></html>`;
      },
    },
  },
});
provider.proxy = false;

async function tamper(idToken, mode) {
  if (mode === 'signature') {
    const [h, p, s] = idToken.split('.');
    const sig = Buffer.from(s, 'base64url');
    sig[sig.length >> 1] ^= 0x01;
    return `${h}.${p}.${sig.toString('base64url')}`;
  }
  const claims = jose.decodeJwt(idToken);
  const now = Math.floor(Date.now() / 1000);
  if (mode === 'nonce') claims.nonce = 'not-the-nonce-poort-sent';
  if (mode === 'audience') claims.aud = 'some-other-client';
  if (mode === 'issuer') claims.iss = 'http://127.0.0.1:1';
  if (mode === 'expired') { claims.iat = now - 7200; claims.exp = now - 3600; }
  if (mode === 'rotated') {
    return new jose.SignJWT(claims).setProtectedHeader({ alg: 'RS256', kid: 'poort-test-2' }).sign(rotated.privateKey);
  }
  return new jose.SignJWT(claims).setProtectedHeader({ alg: 'RS256', kid: signingKey.kid }).sign(privateKey);
}

provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/token' && control.tamper && ctx.body && ctx.body.id_token) {
    ctx.body = { ...ctx.body, id_token: await tamper(ctx.body.id_token, control.tamper) };
  }
});

const callback = provider.callback();

async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  const account = accounts[control.account];
  const grant = new provider.Grant({ accountId: account.sub, clientId: details.params.client_id });
  grant.addOIDCScope(details.params.scope);
  const grantId = await grant.save();
  const login = { accountId: account.sub, amr: control.amr };
  if (control.acr) login.acr = control.acr;
  await provider.interactionFinished(req, res, { login, consent: { grantId } }, { mergeWithLastSubmission: false });
}

const server = http.createServer(async (req, res) => {
  try {
    if (req.method === 'POST' && req.url === '/test/control') {
      let body = '';
      for await (const chunk of req) body += chunk;
      control = { account: 'grace', amr: ['pwd'], acr: undefined, tamper: null, ...JSON.parse(body) };
      if (control.rotate) isRotated = true;
      res.writeHead(204).end();
    } else if (isRotated && req.method === 'GET' && req.url === '/jwks') {
      res.writeHead(200, { 'content-type': 'application/jwk-set+json' }).end(JSON.stringify(await publicJwks(true)));
    } else if (req.url.startsWith('/interaction/')) {
      await interaction(req, res);
    } else {
      callback(req, res);
    }
  } catch (e) {
    console.error(e);
    if (!res.headersSent) res.writeHead(500).end(String(e));
  }
});
server.listen(Number(port), '127.0.0.1', () => console.log(`ready ${issuer}`));
