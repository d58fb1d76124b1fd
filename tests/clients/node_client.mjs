// confluence.js through keygate, with an e-mail-shaped username (confluence.js
// insists on one): a paginated listing across several pages, a tiny link's
// redirect followed, a read of a restricted page through a bypass route.
//
//   node node_client.mjs URL READER_ID READER_SECRET SCANNER_ID SCANNER_SECRET
import { createV2Client } from 'confluence.js';
import { createClient } from 'confluence.js/core';

const [url, readerId, readerSecret, scannerId, scannerSecret] = process.argv.slice(2);
const auth = (id, secret) => ({ type: 'basic', email: `${id}@tools.example.com`, apiToken: secret });
const reader = createV2Client({ host: url, auth: auth(readerId, readerSecret) });
const ids = [];
let cursor;
do {
  const page = await reader.page.getPages({ limit: 1, cursor });
  ids.push(...page.results.map((r) => r.id));
  const next = page._links?.next;
  cursor = next ? (new URL(next, url).searchParams.get('cursor') ?? undefined) : undefined;
} while (cursor);
const raw = createClient({ host: url, auth: auth(readerId, readerSecret) });
const redirected = await raw.sendRequest({ url: '/wiki/x/1001' });
const scanner = createV2Client({ host: url, auth: auth(scannerId, scannerSecret) });
const restricted = await scanner.page.getPageById({ id: 2001 });
console.log(JSON.stringify({ ids, redirected: redirected.id, restricted: restricted.title }));
