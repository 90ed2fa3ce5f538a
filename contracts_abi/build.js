#!/usr/bin/env node
// Compiles the contracts below with the pinned solcjs (npm "solc") and writes each one's build output
// to agent_gateway/testing/<Name>.json, where the package's dev chain (and the demo) load it.
// Usage (from the repo root): npm ci && npm run build:contracts
'use strict';

const fs = require('fs');
const path = require('path');
const solc = require('solc');

// TestUSDC: the dev chain's token. CallBatch: test-only, the attack tests' bundler.
const CONTRACTS = ['TestUSDC', 'CallBatch'];
const here = __dirname;

const settings = {
  optimizer: { enabled: true, runs: 200 },
  // Pinned so the bytecode runs on any anvil/hardhat default hardfork from Cancun on.
  evmVersion: 'cancun',
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } },
};

function build(contract) {
  const source = `${contract}.sol`;
  const input = {
    language: 'Solidity',
    sources: { [source]: { content: fs.readFileSync(path.join(here, source), 'utf8') } },
    settings,
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const diagnostics = output.errors || [];
  for (const d of diagnostics) console.error(d.formattedMessage || d.message);
  if (diagnostics.some((d) => d.severity === 'error')) {
    console.error(`compilation of ${source} failed`);
    process.exit(1);
  }

  const compiled = output.contracts[source][contract];
  const artifact = {
    contractName: contract,
    abi: compiled.abi,
    bytecode: '0x' + compiled.evm.bytecode.object,
    compiler: {
      name: 'solc',
      version: solc.version(),
      optimizer: settings.optimizer,
      evmVersion: settings.evmVersion,
    },
  };

  const outRelPath = path.join('agent_gateway', 'testing', `${contract}.json`);
  fs.writeFileSync(path.join(here, '..', outRelPath), JSON.stringify(artifact, null, 2) + '\n');
  console.log(`wrote ${outRelPath} (solc ${artifact.compiler.version}, ` +
    `${(artifact.bytecode.length - 2) / 2} bytes of init code)`);
}

for (const contract of CONTRACTS) build(contract);
