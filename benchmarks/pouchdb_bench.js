// PouchDB reference for the tidesync benchmarks (run by benchmarks/pouchdb.py with the
// packages it installs into its cache folder; nothing of PouchDB is committed).
//   node pouchdb_bench.js server DIR             -> prints "port N", serves until killed
//   node pouchdb_bench.js push URL DIR N         -> prints "push SECONDS"
//   node pouchdb_bench.js pull URL DIR N         -> prints "pull SECONDS"
//   node pouchdb_bench.js latency URL DIR COUNT WARMUP -> prints "latency ms,ms,..."
'use strict';
const path = require('path');
const PouchDB = require('pouchdb');

function rows(n) {
  const out = [];
  for (let i = 0; i < n; i++) {
    out.push({
      _id: String(i).padStart(8, '0'),
      owner: 'owner-' + (i % 97),
      title: 'task number ' + i + ' with a title of some length',
      qty: i % 1000,
      price: (i % 1000) * 1.25,
      done: i % 3 === 0,
    });
  }
  return out;
}

async function bulk(db, docs) {
  for (let s = 0; s < docs.length; s += 10000) {
    const res = await db.bulkDocs(docs.slice(s, s + 10000));
    for (const r of res) if (r.error) throw new Error('bulkDocs: ' + JSON.stringify(r));
  }
}

async function main() {
  const [mode, ...args] = process.argv.slice(2);
  if (mode === 'server') {
    const express = require('express');
    const expressPouch = require('express-pouchdb');
    const Local = PouchDB.defaults({ prefix: args[0] + path.sep });
    const app = express();
    app.use('/', expressPouch(Local, { mode: 'minimumForPouchDB', logPath: path.join(args[0], 'log.txt') }));
    const srv = app.listen(0, '127.0.0.1', () => console.log('port ' + srv.address().port));
    return;
  }
  const url = args[0];
  const dir = args[1];
  if (mode === 'push') {
    const n = Number(args[2]);
    const local = new PouchDB(path.join(dir, 'a'));
    await bulk(local, rows(n));
    const t0 = process.hrtime.bigint();
    const res = await local.replicate.to(url + '/bench', { batch_size: 1000, batches_limit: 10 });
    const dt = Number(process.hrtime.bigint() - t0) / 1e9;
    if (res.docs_written !== n) throw new Error('pushed ' + res.docs_written + ' of ' + n);
    console.log('push ' + dt);
  } else if (mode === 'pull') {
    const n = Number(args[2]);
    const local = new PouchDB(path.join(dir, 'b'));
    const t0 = process.hrtime.bigint();
    await local.replicate.from(url + '/bench', { batch_size: 1000, batches_limit: 10 });
    const dt = Number(process.hrtime.bigint() - t0) / 1e9;
    const info = await local.info();
    if (info.doc_count !== n) throw new Error('pulled ' + info.doc_count + ' of ' + n);
    console.log('pull ' + dt);
  } else if (mode === 'latency') {
    const count = Number(args[2]);
    const warmup = Number(args[3]);
    const remote = url + '/latency';
    const a = new PouchDB(path.join(dir, 'la'));
    const b = new PouchDB(path.join(dir, 'lb'));
    const sa = a.sync(remote, { live: true, retry: true });
    const sb = b.sync(remote, { live: true, retry: true });
    await new Promise((r) => setTimeout(r, 1000));
    let waiting = null;
    const feed = b.changes({ since: 'now', live: true }).on('change', (c) => {
      if (waiting && c.id === waiting.id) { const w = waiting; waiting = null; w.done(process.hrtime.bigint()); }
    });
    const docs = rows(count + warmup);
    const lat = [];
    for (let k = 0; k < docs.length; k++) {
      const doc = Object.assign({}, docs[k], { _id: 'l' + docs[k]._id });
      const got = new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('no change within 30 s')), 30000);
        waiting = { id: doc._id, done: (t) => { clearTimeout(timer); resolve(t); } };
      });
      const t0 = process.hrtime.bigint();
      await a.put(doc);
      const t1 = await got;
      if (k >= warmup) lat.push(Number(t1 - t0) / 1e6);
    }
    feed.cancel(); sa.cancel(); sb.cancel();
    console.log('latency ' + lat.join(','));
    process.exit(0);
  } else {
    throw new Error('unknown mode ' + mode);
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
