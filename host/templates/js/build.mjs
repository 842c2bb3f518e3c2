// Builds {{name}}.wasm from plugin.js with componentize-js (`npm install`).
import { readFile, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { componentize } from '@bytecodealliance/componentize-js';

const here = (file) => fileURLToPath(new URL(file, import.meta.url));
const source = await readFile(here('plugin.js'), 'utf8');
const { component } = await componentize(source, { witPath: here('wit'), worldName: '{{world}}' });
await writeFile(here('{{name}}.wasm'), component);
console.log('wrote {{name}}.wasm');
