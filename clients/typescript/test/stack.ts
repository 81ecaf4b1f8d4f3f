// The real stack the tests run against: tests/ts_stack.py (nats-server, a broker and a
// worker as separate processes), driven over stdin/stdout so a test can restart the broker.
import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { createInterface, type Interface } from "node:readline";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));

/** The repository root: LANEWAY_REPO, or four levels above dist/test/. */
export const REPO = process.env["LANEWAY_REPO"] ?? resolve(HERE, "..", "..", "..", "..");

type Reply = Record<string, unknown>;

/** PEM file paths of a TLS stack (LANEWAY_TS_TLS=tls or mtls): its CA and a client certificate it signed. */
export interface StackTls {
  ca: string;
  clientCert: string;
  clientKey: string;
}

export class Stack {
  private readonly replies: Reply[] = [];
  // One waiter per command sent, answered in order: the stack answers commands in turn.
  private readonly waiters: ((r: Reply) => void)[] = [];
  private stderr = "";

  private constructor(
    private readonly proc: ChildProcessWithoutNullStreams,
    private readonly lines: Interface,
    public address = "",
    public tls: StackTls | undefined = undefined,
  ) {
    lines.on("line", (line) => {
      let reply: Reply;
      try {
        reply = JSON.parse(line) as Reply;
      } catch {
        return; // not ours
      }
      const waiter = this.waiters.shift();
      if (waiter) waiter(reply);
      else this.replies.push(reply);
    });
    proc.stderr.on("data", (chunk: Buffer) => {
      this.stderr = (this.stderr + chunk.toString()).slice(-20_000);
    });
  }

  /** `env` goes to tests.ts_stack on top of ours: LANEWAY_TS_TLS=tls|mtls for a TLS broker. */
  static async start(env: Record<string, string> = {}): Promise<Stack> {
    const python = process.env["LANEWAY_PYTHON"] ?? join(REPO, ".venv", "bin", "python");
    if (!existsSync(python)) throw new Error(`no Python at ${python}: run 'make venv' (or set LANEWAY_PYTHON)`);
    const proc = spawn(python, ["-m", "tests.ts_stack"], {
      cwd: REPO,
      stdio: ["pipe", "pipe", "pipe"],
      env: { ...process.env, ...env },
    });
    const stack = new Stack(proc, createInterface({ input: proc.stdout }));
    const ready = await stack.next(60_000);
    if (ready["ready"] !== true) throw new Error(`the stack did not start: ${JSON.stringify(ready)}\n${stack.stderr}`);
    stack.address = String(ready["address"]);
    stack.tls = ready["tls"] as StackTls | undefined;
    return stack;
  }

  private next(timeoutMs: number): Promise<Reply> {
    const queued = this.replies.shift();
    if (queued) return Promise.resolve(queued);
    return new Promise((resolve, reject) => {
      const waiter = (r: Reply): void => {
        clearTimeout(timer);
        this.proc.off("exit", onExit);
        resolve(r);
      };
      const timer = setTimeout(() => {
        // Its answer may still come: it is dropped, not handed to the next command's waiter.
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters[i] = () => undefined;
        this.proc.off("exit", onExit);
        reject(new Error(`no answer from tests.ts_stack within ${timeoutMs} ms\n${this.stderr}`));
      }, timeoutMs);
      const onExit = (code: number | null): void => {
        clearTimeout(timer);
        reject(new Error(`tests.ts_stack exited (${code})\n${this.stderr}`));
      };
      this.proc.once("exit", onExit);
      this.waiters.push(waiter);
    });
  }

  /** Kill the broker (SIGKILL, or SIGTERM when graceful) and start a new one on the same
   * address; resolves once it serves. */
  async restartBroker(graceful = false): Promise<void> {
    this.proc.stdin.write(graceful ? "restart-broker graceful\n" : "restart-broker\n");
    const reply = await this.next(60_000);
    if (reply["restarted"] !== true) throw new Error(`restart failed: ${JSON.stringify(reply)}`);
  }

  /** SIGKILL the broker; `startBroker` brings it back on the same address. */
  async killBroker(): Promise<void> {
    this.proc.stdin.write("kill-broker\n");
    const reply = await this.next(30_000);
    if (reply["killed"] !== true) throw new Error(`kill failed: ${JSON.stringify(reply)}`);
  }

  async startBroker(): Promise<void> {
    this.proc.stdin.write("start-broker\n");
    const reply = await this.next(60_000);
    if (reply["started"] !== true) throw new Error(`start failed: ${JSON.stringify(reply)}`);
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode !== null) return;
    const exited = new Promise<void>((resolve) => this.proc.once("exit", () => resolve()));
    this.proc.stdin.end("quit\n");
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 20_000);
    await exited;
    clearTimeout(timer);
  }
}
