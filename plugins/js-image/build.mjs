// Builds js_image.wasm from plugin.js with componentize-js: `node build.mjs [OUT]`.
import { readFile, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { componentize } from '@bytecodealliance/componentize-js';

const here = (file) => fileURLToPath(new URL(file, import.meta.url));
const out = process.argv[2] ?? here('js_image.wasm');
const source = await readFile(here('plugin.js'), 'utf8');
const { component } = await componentize(source, { witPath: here('../../wit/0.1.0'), worldName: 'image-step' });
await writeFile(out, component);
console.log(`wrote ${out}`);
