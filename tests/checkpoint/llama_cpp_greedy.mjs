// Run a GGUF file in real llama.cpp (the prebuilt binaries of node-llama-cpp) and print token ids as JSON.
//
//   node llama_cpp_greedy.mjs MODEL.gguf JOBS.json
//
// JOBS.json: {"greedy": [[ids...], ...], "max_new_tokens": N, "forced": [[ids...], ...]}
//   greedy: each prompt (token ids, no BOS added) is decoded greedily for max_new_tokens tokens
//           (temperature 0: the argmax of the logits, no penalties).
//   forced: each sequence is evaluated teacher-forced; for every position i the argmax next token
//           after ids[0..i] is reported (llama.cpp's top-1, for agreement checks).
// Prints {"greedy": [[new ids...], ...], "forced": [[top-1 ids...], ...]} on stdout.
// The LAMINA_NODE_MODULES folder (else the working directory's node_modules) holds node-llama-cpp 3.21.1.
// Threads: LAMINA_LLAMA_THREADS, else one per core (node-llama-cpp's default is far slower on 2 cores).
// LAMINA_LLAMA_LOG=warn shows llama.cpp's loading errors.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createRequire } from "node:module";

const [modelPath, jobsPath] = process.argv.slice(2);
const jobs = JSON.parse(fs.readFileSync(jobsPath, "utf8"));
const modules = process.env.LAMINA_NODE_MODULES;
const require = createRequire(path.join(modules ?? process.cwd(), "x.js"));
const { getLlama, LlamaLogLevel } = await import(require.resolve("node-llama-cpp"));

const threads = Number(process.env.LAMINA_LLAMA_THREADS) || (os.availableParallelism ? os.availableParallelism() : os.cpus().length);
const llama = await getLlama({ gpu: false, build: "never", logLevel: process.env.LAMINA_LLAMA_LOG ?? LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath });
const longest = Math.max(
  16,
  ...(jobs.greedy ?? []).map((p) => p.length + (jobs.max_new_tokens ?? 0)),
  ...(jobs.forced ?? []).map((p) => p.length),
);
const context = await model.createContext({
  contextSize: Math.min(longest + 8, model.trainContextSize),
  batchSize: 512,
  threads,
  sequences: 1,
});
const greedyNext = { token: true, options: { temperature: 0 } };

const sequence = context.getSequence();
async function fresh() {
  await sequence.clearHistory(); // every job starts from an empty KV cache
  return sequence;
}

const out = { greedy: [], forced: [] };
for (const prompt of jobs.greedy ?? []) {
  await fresh();
  const ids = [];
  let input = prompt.map((t, i) => (i === prompt.length - 1 ? [t, { generateNext: greedyNext }] : t));
  for (let step = 0; step < jobs.max_new_tokens; step++) {
    const res = await sequence.controlledEvaluate(input);
    const next = res[input.length - 1].next.token;
    ids.push(next);
    input = [[next, { generateNext: greedyNext }]];
  }
  out.greedy.push(ids);
}
for (const tokens of jobs.forced ?? []) {
  await fresh();
  const res = await sequence.controlledEvaluate(tokens.map((t) => [t, { generateNext: greedyNext }]));
  out.forced.push(res.map((r) => r.next.token));
}
process.stdout.write(JSON.stringify(out) + "\n");
await context.dispose();
await model.dispose();
await llama.dispose();
