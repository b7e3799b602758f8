// Time a GGUF in real llama.cpp (node-llama-cpp's prebuilt CPU binaries) for benchmarks/decode.py.
//
//   node llama_cpp_bench.mjs MODEL.gguf CONTEXT_SIZE
//
// Reads one JSON job per line on stdin and answers one JSON line on stdout, so that the Python side can
// time llama.cpp round-robin with lamina in the same run:
//   {"op": "decode", "prompt": [ids...], "n": N}  -> {"seconds": s, "tokens": [N greedy ids]}
//        (the prompt is evaluated first, untimed; then N greedy steps of one token each are timed)
//   {"op": "prefill", "ids": [ids...]}            -> {"seconds": s, "token": next greedy id}
// Every job starts from an empty KV cache. Threads: LAMINA_LLAMA_THREADS (else one per core).
// LAMINA_NODE_MODULES is the folder holding node-llama-cpp 3.21.1 (as tests/checkpoint/llama_cpp_greedy.mjs).
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { createRequire } from "node:module";

const [modelPath, contextSize] = process.argv.slice(2);
const modules = process.env.LAMINA_NODE_MODULES;
const require = createRequire(path.join(modules ?? process.cwd(), "x.js"));
const { getLlama, LlamaLogLevel } = await import(require.resolve("node-llama-cpp"));

const threads = Number(process.env.LAMINA_LLAMA_THREADS) || os.cpus().length;
const llama = await getLlama({ gpu: false, build: "never", logLevel: process.env.LAMINA_LLAMA_LOG ?? LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath });
const context = await model.createContext({ contextSize: Number(contextSize), batchSize: 512, threads, sequences: 1 });
const sequence = context.getSequence();
const greedyNext = { token: true, options: { temperature: 0 } };

async function decode(prompt, n) {
  await sequence.clearHistory();
  const head = prompt.slice(0, -1);
  if (head.length) await sequence.controlledEvaluate(head);
  let input = [[prompt[prompt.length - 1], { generateNext: greedyNext }]];
  const tokens = [];
  const t0 = process.hrtime.bigint();
  for (let step = 0; step < n; step++) {
    const res = await sequence.controlledEvaluate(input);
    const next = res[0].next.token;
    tokens.push(next);
    input = [[next, { generateNext: greedyNext }]];
  }
  return { seconds: Number(process.hrtime.bigint() - t0) / 1e9, tokens };
}

async function prefill(ids) {
  await sequence.clearHistory();
  const input = ids.map((t, i) => (i === ids.length - 1 ? [t, { generateNext: greedyNext }] : t));
  const t0 = process.hrtime.bigint();
  const res = await sequence.controlledEvaluate(input);
  return { seconds: Number(process.hrtime.bigint() - t0) / 1e9, token: res[ids.length - 1].next.token };
}

process.stdout.write(JSON.stringify({ ready: true, threads }) + "\n");
for await (const line of readline.createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const job = JSON.parse(line);
  const out = job.op === "decode" ? await decode(job.prompt, job.n) : await prefill(job.ids);
  process.stdout.write(JSON.stringify(out) + "\n");
}
await context.dispose();
await model.dispose();
await llama.dispose();
