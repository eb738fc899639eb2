// Drives the server's AI SDK endpoints with the real `ai` client (see tests/test_ai_sdk.py).
//
// usage: node chat.mjs '<scenario JSON>'   ->  one JSON result on stdout
//
// scenario: {url, transport: "http" | "ws", key?, chats: {name: {id, messages?, auto?, clientTools?}}, steps: [step...]}
//   auto: "approvals" | "toolCalls" — `sendAutomaticallyWhen` lastAssistantMessageIsCompleteWith
//         ApprovalResponses / ToolCalls (useChat's way of sending tool answers back by itself)
//   clientTools: {toolName: {output} | {errorText}} — `onToolCall` answers these tools with
//         Chat.addToolOutput (not awaited, as the AI SDK docs say: it would deadlock)
// steps (run in order; "parallel" runs its steps concurrently):
//   {op: "send", chat, text, files?, body?}  Chat.sendMessage (what useChat's sendMessage does);
//                                          files: FileUIParts {type: "file", mediaType, url, filename?}
//   {op: "stop", chat, text, afterChars, body?}  sendMessage, then Chat.stop() once the answer
//                                          has at least afterChars characters
//   {op: "resume", chat}                   Chat.resumeStream() (useChat({resume: true}))
//   {op: "read", chat, text}               transport.sendMessages + readUIMessageStream
//   {op: "reconnect", chat}                transport.reconnectToStream + readUIMessageStream
//   {op: "parallel", steps: [...]}
//   {op: "approve", chat, approved, reason?}  Chat.addToolApprovalResponse for every call waiting
//                                          for approval in the last message, then waits for the
//                                          request that sends them (auto) to finish
//   {op: "use", url}                       later requests go to this server (another worker)
// The result has, per chat, its messages, status, error, the onFinish calls and the chunks
// it received, plus `reads` (readUIMessageStream results), `sockets` (WebSockets opened) and
// `requests` (what each sendMessages sent: trigger, messageId, the last message).
import {
  lastAssistantMessageIsCompleteWithApprovalResponses,
  lastAssistantMessageIsCompleteWithToolCalls,
  readUIMessageStream,
} from 'ai';
import WebSocket from 'ws';
import { Chat, runSteps, transportFor as sharedTransportFor } from './chat_state.mjs';

const scenario = JSON.parse(process.argv[2]);

let sockets = 0;
class CountingWebSocket extends WebSocket {
  constructor(...args) {
    super(...args);
    sockets += 1;
  }
}

const requests = [];
function prepare({ id, messages, trigger, messageId }) {
  const last = messages[messages.length - 1];
  requests.push({ chatId: id, trigger, messageId: messageId ?? null, last: structuredClone(last) });
  return undefined; // (the transport's own request)
}

// Node 20 has no global WebSocket: hand the transport the `ws` implementation.
// `key` authenticates as a browser would: a header over HTTP, the subprotocols over WebSocket.
const transportFor = (url) => sharedTransportFor(scenario, url, CountingWebSocket, prepare);
const transports = { [scenario.url]: transportFor(scenario.url) };
let current = scenario.url; // (`use` switches it)
// Delegates to the current server's transport.
const base = {
  get resumeStreamIsReplay() {
    return transports[current].resumeStreamIsReplay;
  },
  sendMessages: (options) => transports[current].sendMessages(options),
  reconnectToStream: (options) => transports[current].reconnectToStream(options),
  close: () => Object.values(transports).forEach((t) => t.close?.()),
};

// Records every chunk a chat receives, passing everything else through.
function recording(transport, chunks) {
  const tap = (stream) =>
    stream.pipeThrough(
      new TransformStream({
        transform(chunk, controller) {
          chunks.push(chunk);
          controller.enqueue(chunk);
        },
      }),
    );
  return {
    resumeStreamIsReplay: transport.resumeStreamIsReplay,
    sendMessages: async (options) => tap(await transport.sendMessages(options)),
    reconnectToStream: async (options) => {
      const stream = await transport.reconnectToStream(options);
      return stream == null ? null : tap(stream);
    },
    close: () => transport.close?.(),
  };
}

const AUTO = {
  approvals: lastAssistantMessageIsCompleteWithApprovalResponses,
  toolCalls: lastAssistantMessageIsCompleteWithToolCalls,
};

const chats = {};
for (const [name, spec] of Object.entries(scenario.chats)) {
  const record = { chunks: [], finishes: [], errors: [], toolCalls: [] };
  record.chat = new Chat({
    id: spec.id,
    messages: spec.messages ?? [],
    transport: recording(base, record.chunks),
    sendAutomaticallyWhen: spec.auto ? AUTO[spec.auto] : undefined,
    onToolCall: ({ toolCall }) => {
      record.toolCalls.push({ toolCallId: toolCall.toolCallId, toolName: toolCall.toolName, input: toolCall.input });
      const answer = spec.clientTools?.[toolCall.toolName];
      if (answer == null) return; // (a tool the server runs)
      const { toolCallId, toolName } = toolCall;
      record.chat.addToolOutput(
        'errorText' in answer
          ? { state: 'output-error', tool: toolName, toolCallId, errorText: answer.errorText }
          : { tool: toolName, toolCallId, output: answer.output },
      );
    },
    onError: (error) => record.errors.push(error.message),
    onFinish: ({ isAbort, isError, isDisconnect, finishReason, message }) =>
      record.finishes.push({ isAbort, isError, isDisconnect, finishReason, messageId: message.id }),
  });
  chats[name] = record;
}

const reads = [];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function readAll(stream) {
  const chunks = [];
  const errors = [];
  const tapped = stream.pipeThrough(
    new TransformStream({
      transform(chunk, controller) {
        chunks.push(chunk);
        controller.enqueue(chunk);
      },
    }),
  );
  let last = null;
  for await (const message of readUIMessageStream({ stream: tapped, onError: (e) => errors.push(e.message) })) {
    last = message;
  }
  return { message: last, chunks, errors };
}

function answerChars(chat) {
  const last = chat.messages[chat.messages.length - 1];
  if (last?.role !== 'assistant') return 0;
  return last.parts.filter((p) => p.type === 'text').reduce((n, p) => n + p.text.length, 0);
}

async function run(step) {
  const record = chats[step.chat];
  switch (step.op) {
    case 'send':
      await record.chat.sendMessage(step.files ? { text: step.text, files: step.files } : { text: step.text },
                                    step.body ? { body: step.body } : undefined);
      return;
    case 'stop': {
      const sending = record.chat.sendMessage({ text: step.text }, step.body ? { body: step.body } : undefined);
      const deadline = Date.now() + 10000;
      while (answerChars(record.chat) < step.afterChars && Date.now() < deadline) await sleep(5);
      await record.chat.stop();
      await sending;
      return;
    }
    case 'resume':
      await record.chat.resumeStream();
      return;
    case 'read': {
      const stream = await base.sendMessages({
        chatId: scenario.chats[step.chat].id,
        messages: [{ id: `u-${Math.random().toString(36).slice(2)}`, role: 'user', parts: [{ type: 'text', text: step.text }] }],
        trigger: 'submit-message',
        messageId: undefined,
        abortSignal: undefined,
      });
      reads.push(await readAll(stream));
      return;
    }
    case 'reconnect': {
      const stream = await base.reconnectToStream({ chatId: scenario.chats[step.chat].id });
      reads.push(stream == null ? null : await readAll(stream));
      return;
    }
    case 'parallel':
      await Promise.all(step.steps.map(run));
      return;
    case 'sleep':
      await sleep(step.ms);
      return;
    case 'use':
      transports[step.url] ??= transportFor(step.url);
      current = step.url;
      return;
    case 'approve': {
      const chat = record.chat;
      const finishes = record.finishes.length;
      const last = chat.messages[chat.messages.length - 1];
      const waiting = last.parts.filter((p) => p.state === 'approval-requested');
      if (waiting.length === 0) throw new Error('no tool call waits for approval');
      for (const part of waiting) {
        await chat.addToolApprovalResponse({ id: part.approval.id, approved: step.approved, reason: step.reason });
      }
      // The automatic request (sendAutomaticallyWhen) runs on its own: wait for its onFinish.
      const deadline = Date.now() + 20000;
      while ((record.finishes.length === finishes || chat.status === 'submitted' || chat.status === 'streaming') &&
             Date.now() < deadline) await sleep(10);
      return;
    }
    default:
      throw new Error(`unknown step ${step.op}`);
  }
}

await runSteps(scenario, run);
base.close?.();

const out = { sockets, reads, requests, chats: {} };
for (const [name, record] of Object.entries(chats)) {
  out.chats[name] = {
    id: record.chat.id,
    status: record.chat.status,
    error: record.chat.error?.message ?? null,
    errors: record.errors,
    finishes: record.finishes,
    toolCalls: record.toolCalls,
    chunks: record.chunks,
    messages: record.chat.messages,
  };
}
process.stdout.write(JSON.stringify(out));
process.exit(0);
