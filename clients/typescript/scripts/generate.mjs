#!/usr/bin/env node
// Generate src/gen from ../../protos and proto-vendor with buf and protoc-gen-es
// (buf.gen.yaml), or with --check regenerate into a temporary directory and fail if
// it differs from the committed src/gen.
//
// buf: $BUF, else the repository's ../../.venv/bin/buf (`make venv`), else `buf` on PATH.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const PKG = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const GEN = "src/gen";

function buf() {
  if (process.env.BUF) return process.env.BUF;
  const venv = resolve(PKG, "..", "..", ".venv", "bin", "buf");
  return existsSync(venv) ? venv : "buf";
}

function generate(outBase) {
  if (!existsSync(join(PKG, "node_modules", ".bin", "protoc-gen-es"))) {
    console.error("node_modules/.bin/protoc-gen-es is missing: run `npm ci` first");
    process.exit(2);
  }
  const args = ["generate", "--template", "buf.gen.yaml"];
  if (outBase) args.push("-o", outBase);
  const res = spawnSync(buf(), args, { cwd: PKG, stdio: "inherit" });
  if (res.error) {
    console.error(`cannot run ${buf()}: ${res.error.message}`);
    process.exit(2);
  }
  if (res.status !== 0) process.exit(res.status ?? 1);
}

function files(dir) {
  const out = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...files(p));
    else out.push(p);
  }
  return out;
}

if (process.argv.includes("--check")) {
  const tmp = mkdtempSync(join(tmpdir(), "laneway-ts-gen-"));
  try {
    generate(tmp);
    const fresh = join(tmp, GEN);
    const committed = join(PKG, GEN);
    const want = files(fresh).map((f) => relative(fresh, f)).sort();
    const have = existsSync(committed) ? files(committed).map((f) => relative(committed, f)).sort() : [];
    const problems = [];
    for (const f of want) {
      if (!have.includes(f)) problems.push(`missing: ${GEN}/${f}`);
      else if (!readFileSync(join(fresh, f)).equals(readFileSync(join(committed, f)))) problems.push(`differs: ${GEN}/${f}`);
    }
    for (const f of have) if (!want.includes(f)) problems.push(`not generated: ${GEN}/${f}`);
    if (problems.length) {
      console.error(problems.join("\n"));
      const first = want.find((f) => have.includes(f) && problems.includes(`differs: ${GEN}/${f}`));
      if (first) {
        const diff = spawnSync("diff", ["-u", join(committed, first), join(fresh, first)], { encoding: "utf8" });
        if (diff.stdout) console.error(diff.stdout.split("\n").slice(0, 60).join("\n"));
      }
      console.error("generated code is stale: run `npm run generate` in clients/typescript and commit");
      process.exit(1);
    }
    console.log(`${GEN} matches the protos`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
} else {
  generate();
}
