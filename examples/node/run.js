#!/usr/bin/env node
// Run an atpatch-patched ONNX model in Node.js: no Python, no custom-op library. onnxruntime
// inlines the AtPatch op's model-local ONNX function, so the file runs as-is.
//
//   node run.js MODEL.onnx INPUTS.json OUTPUTS.json
//
// INPUTS.json / OUTPUTS.json map tensor names to {"type": "int64" | "float32" | ..., "dims": [...],
// "data": [...]} with data flattened in row-major order. JSON numbers are doubles, so float32
// values survive the round trip exactly; int64 inputs must stay below 2**53 (token ids do).
'use strict';

const fs = require('node:fs');
const ort = require('onnxruntime-node');

const ARRAYS = {
  float32: Float32Array,
  float64: Float64Array,
  int32: Int32Array,
  int64: BigInt64Array,
  uint8: Uint8Array,
  int8: Int8Array,
  bool: Uint8Array,
};

function toTensor(name, spec) {
  const Array_ = ARRAYS[spec.type];
  if (!Array_) {
    throw new Error(`input ${name}: type ${spec.type} is not supported; use one of ${Object.keys(ARRAYS).join(', ')}`);
  }
  const data = spec.type === 'int64' ? BigInt64Array.from(spec.data, BigInt) : Array_.from(spec.data);
  return new ort.Tensor(spec.type, data, spec.dims);
}

function fromTensor(tensor) {
  // BigInt and typed-array values become plain JSON numbers.
  return { type: tensor.type, dims: Array.from(tensor.dims), data: Array.from(tensor.data, Number) };
}

async function main(argv) {
  if (argv.length !== 3) {
    console.error('usage: node run.js MODEL.onnx INPUTS.json OUTPUTS.json');
    return 2;
  }
  const [modelPath, inputsPath, outputsPath] = argv;
  const specs = JSON.parse(fs.readFileSync(inputsPath, 'utf8'));
  const session = await ort.InferenceSession.create(modelPath, { executionProviders: ['cpu'] });
  const feeds = {};
  for (const name of session.inputNames) {
    if (!(name in specs)) {
      throw new Error(`${inputsPath} has no input ${name}; the model needs ${session.inputNames.join(', ')}`);
    }
    feeds[name] = toTensor(name, specs[name]);
  }
  const results = await session.run(feeds);
  const outputs = {};
  for (const name of session.outputNames) {
    outputs[name] = fromTensor(results[name]);
  }
  fs.writeFileSync(outputsPath, JSON.stringify(outputs));
  console.log(`onnxruntime-node ${require('onnxruntime-node/package.json').version}: ran ${modelPath}, ` +
    `wrote ${session.outputNames.join(', ')} to ${outputsPath}`);
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(`run.js: error: ${err.message}`);
    process.exit(1);
  },
);
