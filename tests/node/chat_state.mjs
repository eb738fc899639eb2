// The chat state a framework binding (React's useChat) keeps, as plain arrays, and a Chat on it:
// what chat.mjs and rewind.mjs drive, and what they share.
import { AbstractChat, DefaultChatTransport, WebSocketChatTransport } from 'ai';

class State {
  constructor(messages) {
    this.status = 'ready';
    this.error = undefined;
    this.messages = messages;
  }
  pushMessage(message) {
    this.messages = this.messages.concat(message);
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
  }
  replaceMessage(index, message) {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
  }
  snapshot(thing) {
    return structuredClone(thing);
  }
}

export class Chat extends AbstractChat {
  constructor({ messages = [], ...init }) {
    super({ ...init, state: new State(messages) });
  }
}

// Runs the scenario's steps in order with `run`; a scenario that takes longer than its
// `timeoutMs` (default 30 s) ends the process with exit code 3.
export async function runSteps(scenario, run) {
  const timer = setTimeout(() => {
    console.error('scenario timed out');
    process.exit(3);
  }, scenario.timeoutMs ?? 30000);
  for (const step of scenario.steps) await run(step);
  clearTimeout(timer);
}

// The transport useChat talks to one server with (`scenario.transport`: "http" or "ws"; `scenario.key`:
// an API key), every request going through `prepare` (prepareSendMessagesRequest).
export function transportFor(scenario, url, webSocket, prepare) {
  return scenario.transport === 'ws'
    ? new WebSocketChatTransport({
        url: url.replace(/^http/, 'ws') + '/api/chat/ws',
        webSocket, // (Node 20 has no global WebSocket)
        protocols: scenario.key ? ['agent', `bearer.${scenario.key}`] : undefined,
        prepareSendMessagesRequest: prepare,
      })
    : new DefaultChatTransport({
        api: url + '/api/chat',
        headers: scenario.key ? { authorization: `Bearer ${scenario.key}` } : undefined,
        prepareSendMessagesRequest: prepare,
      });
}
