// Shorthands for JobSpec inputs, so a submit reads
// `client.submit({ route: "chat", input: chat("hello") })`.
import type { MessageInitShape } from "@bufbuild/protobuf";
import {
  ChatRole,
  type ChatInputSchema,
  type ChatMessageSchema,
  type GenerationParamsSchema,
  type JobSpecSchema,
} from "./gen/laneway/v1/job_pb.js";

/** What `submit`, `submitBatch` and `run` take: a JobSpec as a plain object (every field optional). */
export type JobSpecInit = MessageInitShape<typeof JobSpecSchema>;
/** JobSpec's `input` oneof: `{ case: "chat" | "embedding" | "classification", value }`. */
export type JobInput = NonNullable<JobSpecInit["input"]>;
export type ChatMessageInit = MessageInitShape<typeof ChatMessageSchema>;
export type GenerationParamsInit = MessageInitShape<typeof GenerationParamsSchema>;

export interface ChatOptions {
  /** Stream text deltas (RUNNING events with a `delta` payload) as they are generated. */
  stream?: boolean;
  /** Generation parameters (max_tokens, temperature, top_p, stop). */
  params?: GenerationParamsInit;
  /** A system message put before the user's. */
  system?: string;
}

/** A chat input: one user message, or a whole conversation. */
export function chat(messages: string | ChatMessageInit[], options: ChatOptions = {}): JobInput {
  const list: ChatMessageInit[] =
    typeof messages === "string" ? [{ role: ChatRole.USER, content: messages }] : [...messages];
  if (options.system !== undefined) list.unshift({ role: ChatRole.SYSTEM, content: options.system });
  const value: MessageInitShape<typeof ChatInputSchema> = { messages: list, stream: options.stream ?? false };
  if (options.params !== undefined) value.params = options.params;
  return { case: "chat", value };
}

/** An embedding input: one vector per text. */
export function embedding(texts: string | string[]): JobInput {
  return { case: "embedding", value: { texts: typeof texts === "string" ? [texts] : texts } };
}

/** A classification input: `text` into exactly one of `labels`. */
export function classification(text: string, labels: string[]): JobInput {
  return { case: "classification", value: { text, labels } };
}
