// Edit and regenerate with the real `ai` client (see tests/test_ai_sdk_rewind.py).
//
// usage: node rewind.mjs '<scenario JSON>'   ->  one JSON result on stdout
//
// scenario: {url, transport: "http" | "ws", key?, chats: {name: {id, messages?}}, steps: [step...]}
//   messages: the chat's messages to start with (a page restoring a stored conversation)
// steps (run in order):
//   {op: "send", chat, text}             Chat.sendMessage({text}) (useChat's sendMessage)
//   {op: "regenerate", chat, index?}     Chat.regenerate() (useChat's regenerate); with `index`,
//                                        regenerate({messageId: messages[index].id}) (negative: from the end)
//   {op: "edit", chat, index, text}      Chat.sendMessage({text, messageId: messages[index].id}):
//                                        the user message at `index` edited, what follows it dropped
//   {op: "snapshot", chat}               the chat's messages now, to `snapshots`
//   {op: "session", chat}                GET /sessions/{id} of the current server, to `sessions`
//   {op: "use", url}                     later requests go to this server
// The result has, per chat, its messages, status, error, errors (onError) and finishes, plus
// `requests` (what each request sent: trigger, messageId, [id, role] of every message),
// `snapshots` and `sessions`.
import WebSocket from 'ws';
import { Chat, runSteps, transportFor as sharedTransportFor } from './chat_state.mjs';

const scenario = JSON.parse(process.argv[2]);

const requests = [];
function prepare({ id, messages, trigger, messageId }) {
  requests.push({ chatId: id, trigger, messageId: messageId ?? null,
                  messages: messages.map((m) => [m.id, m.role]) });
  return undefined; // (the transport's own request)
}

const transportFor = (url) => sharedTransportFor(scenario, url, WebSocket, prepare);
const transports = { [scenario.url]: transportFor(scenario.url) };
let current = scenario.url;
const transport = {
  get resumeStreamIsReplay() {
    return transports[current].resumeStreamIsReplay;
  },
  sendMessages: (options) => transports[current].sendMessages(options),
  reconnectToStream: (options) => transports[current].reconnectToStream(options),
};

const chats = {};
for (const [name, spec] of Object.entries(scenario.chats)) {
  const record = { errors: [], finishes: [] };
  record.chat = new Chat({
    id: spec.id,
    messages: spec.messages ?? [],
    transport,
    onError: (error) => record.errors.push(error.message),
    onFinish: ({ isAbort, isError, finishReason, message }) =>
      record.finishes.push({ isAbort, isError, finishReason, messageId: message.id }),
  });
  chats[name] = record;
}

const snapshots = [];
const sessions = [];
const at = (messages, index) => messages[index < 0 ? messages.length + index : index];

async function run(step) {
  const chat = chats[step.chat]?.chat;
  switch (step.op) {
    case 'send':
      await chat.sendMessage({ text: step.text });
      return;
    case 'regenerate':
      await chat.regenerate(step.index == null ? {} : { messageId: at(chat.messages, step.index).id });
      return;
    case 'edit':
      await chat.sendMessage({ text: step.text, messageId: at(chat.messages, step.index).id });
      return;
    case 'snapshot':
      snapshots.push(structuredClone(chat.messages));
      return;
    case 'session': {
      const response = await fetch(`${current}/sessions/${encodeURIComponent(chat.id)}`, {
        headers: scenario.key ? { authorization: `Bearer ${scenario.key}` } : {},
      });
      sessions.push({ status: response.status, body: await response.json() });
      return;
    }
    case 'use':
      transports[step.url] ??= transportFor(step.url);
      current = step.url;
      return;
    default:
      throw new Error(`unknown step ${step.op}`);
  }
}

await runSteps(scenario, run);
Object.values(transports).forEach((t) => t.close?.());

const out = { requests, snapshots, sessions, chats: {} };
for (const [name, record] of Object.entries(chats)) {
  out.chats[name] = {
    id: record.chat.id,
    status: record.chat.status,
    error: record.chat.error?.message ?? null,
    errors: record.errors,
    finishes: record.finishes,
    messages: record.chat.messages,
  };
}
process.stdout.write(JSON.stringify(out));
process.exit(0);
