// Plain words for a TLS mismatch with the broker. Node's HTTP/2 reports a plaintext
// client talking to a TLS broker (and a client without the certificate an mTLS broker
// requires) as the stream being closed with CANCEL, which Connect maps to CANCELLED:
// it reads as if the caller had cancelled. This interceptor turns exactly that case
// (the caller did not abort; no response arrived) into UNAVAILABLE with a hint on
// what to pass, as the Python client does.
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";

const CLOSED_WITH_CANCEL = "stream closed with error code CANCEL";

/** An interceptor (innermost) that explains a connection the broker closed at once. */
export function explainTransportErrors(tls: boolean, clientCert: boolean): Interceptor {
  const hint = !tls
    ? "the broker closed the connection at once: it may require TLS, and this client connects " +
      "in plaintext (pass tls: true, or tls: { ca } with the broker's CA)"
    : clientCert
      ? "the broker closed the connection during the TLS handshake: it may not accept this " +
        "client certificate (mTLS: one its client CA signed)"
      : "the broker closed the connection during the TLS handshake: it may require a client " +
        "certificate (mTLS: tls: { ca, cert, key })";
  return (next) => async (req) => {
    try {
      return await next(req);
    } catch (err) {
      const ce = err instanceof ConnectError ? err : undefined;
      if (ce?.code !== Code.Canceled || req.signal.aborted || !ce.rawMessage.includes(CLOSED_WITH_CANCEL)) {
        throw err;
      }
      throw new ConnectError(`${ce.rawMessage} (${hint})`, Code.Unavailable, ce.metadata, undefined, ce);
    }
  };
}
