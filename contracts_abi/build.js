#!/usr/bin/env node
// Compiles TestUSDC.sol with the pinned solcjs (npm "solc") and writes its build output to
// agent_gateway/testing/TestUSDC.json, where the package's dev chain (and the demo) load it.
// Usage (from the repo root): npm ci && npm run build:contracts
'use strict';

const fs = require('fs');
const path = require('path');
const solc = require('solc');

const CONTRACT = 'TestUSDC';
const SOURCE = `${CONTRACT}.sol`;
const here = __dirname;

const settings = {
  optimizer: { enabled: true, runs: 200 },
  // Pinned so the bytecode runs on any anvil/hardhat default hardfork from Cancun on.
  evmVersion: 'cancun',
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } },
};

const input = {
  language: 'Solidity',
  sources: { [SOURCE]: { content: fs.readFileSync(path.join(here, SOURCE), 'utf8') } },
  settings,
};

const output = JSON.parse(solc.compile(JSON.stringify(input)));
const diagnostics = output.errors || [];
for (const d of diagnostics) console.error(d.formattedMessage || d.message);
if (diagnostics.some((d) => d.severity === 'error')) {
  console.error('compilation failed');
  process.exit(1);
}

const compiled = output.contracts[SOURCE][CONTRACT];
const artifact = {
  contractName: CONTRACT,
  abi: compiled.abi,
  bytecode: '0x' + compiled.evm.bytecode.object,
  compiler: {
    name: 'solc',
    version: solc.version(),
    optimizer: settings.optimizer,
    evmVersion: settings.evmVersion,
  },
};

const outRelPath = path.join('agent_gateway', 'testing', `${CONTRACT}.json`);
const outPath = path.join(here, '..', outRelPath);
fs.writeFileSync(outPath, JSON.stringify(artifact, null, 2) + '\n');
console.log(`wrote ${outRelPath} (solc ${artifact.compiler.version}, ` +
  `${(artifact.bytecode.length - 2) / 2} bytes of init code)`);
