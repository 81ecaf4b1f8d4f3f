// A TLS-terminating gRPC proxy in front of the plaintext broker, for testing the
// client's `tls` and `metadata` options: a self-signed certificate made with openssl,
// and an optional bearer token the proxy demands (UNAUTHENTICATED otherwise).
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import * as http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** A self-signed certificate for 127.0.0.1 and localhost, or undefined without openssl. */
export function selfSigned(): { cert: string; key: string } | undefined {
  const dir = mkdtempSync(join(tmpdir(), "laneway-tls-"));
  try {
    execFileSync(
      "openssl",
      [
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem"), "-days", "1",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
      ],
      { stdio: "ignore" },
    );
    return { cert: readFileSync(join(dir, "cert.pem"), "utf8"), key: readFileSync(join(dir, "key.pem"), "utf8") };
  } catch {
    return undefined;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const HOP = new Set([":status", ":method", ":path", ":scheme", ":authority", "connection", "host"]);

function forward(headers: http2.IncomingHttpHeaders): http2.OutgoingHttpHeaders {
  const out: http2.OutgoingHttpHeaders = {};
  for (const [k, v] of Object.entries(headers)) if (!HOP.has(k) && v !== undefined) out[k] = v;
  return out;
}

export class TlsProxy {
  private constructor(
    private readonly server: http2.Http2SecureServer,
    private readonly upstream: http2.ClientHttp2Session,
    readonly address: string,
  ) {}

  static async start(backend: string, tls: { cert: string; key: string }, token?: string): Promise<TlsProxy> {
    const upstream = http2.connect(`http://${backend}`);
    upstream.on("error", () => {});
    const server = http2.createSecureServer({ cert: tls.cert, key: tls.key });
    server.on("stream", (stream, headers) => {
      stream.on("error", () => {});
      if (token !== undefined && headers["authorization"] !== `Bearer ${token}`) {
        stream.respond(
          { ":status": 200, "content-type": "application/grpc", "grpc-status": "16", "grpc-message": "missing or wrong bearer token" },
          { endStream: true },
        );
        return;
      }
      const req = upstream.request({ ":method": "POST", ":path": headers[":path"], ...forward(headers) });
      req.on("error", () => stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR));
      let trailers: http2.OutgoingHttpHeaders = {};
      req.on("trailers", (t) => {
        trailers = forward(t);
      });
      req.on("response", (h) => {
        if (h["grpc-status"] !== undefined) {
          // Trailers-only (an error before any message).
          stream.respond({ ":status": 200, ...forward(h) }, { endStream: true });
          return;
        }
        stream.respond({ ":status": 200, ...forward(h) }, { waitForTrailers: true });
        stream.on("wantTrailers", () => stream.sendTrailers(trailers));
        req.pipe(stream);
      });
      stream.pipe(req);
      stream.on("close", () => req.close());
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const port = (server.address() as AddressInfo).port;
    return new TlsProxy(server, upstream, `127.0.0.1:${port}`);
  }

  async stop(): Promise<void> {
    this.upstream.close();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
