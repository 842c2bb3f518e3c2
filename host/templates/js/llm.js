// {{name}}: a genpipe plugin for the `llm-step` world, in JavaScript.
//
// It answers with the prompt's words in reverse order, charging `credits_per_token` (a setting,
// default 1) for each word and streaming four words at a time. Replace `generate` with your own.

import { get } from 'genpipe:plugin/config@0.1.0';
import { charge } from 'genpipe:plugin/credits@0.1.0';
import { emit } from 'genpipe:plugin/output@0.1.0';
import { cancelled, report } from 'genpipe:plugin/status@0.1.0';

export function generate(request) {
  const price = BigInt(get('credits_per_token') ?? '1');
  const words = request.prompt.split(/\s+/).filter(Boolean).reverse().slice(0, request.maxTokens);
  if (words.length === 0) {
    throw { tag: 'invalid-input', val: 'the prompt is empty; give a few words' };
  }
  report('preparing', 0, 'reversing the prompt');
  const kept = [];
  let pending = [];
  for (const [i, word] of words.entries()) {
    if (cancelled()) {
      throw { tag: 'cancelled' };
    }
    if (price > 0n) {
      try {
        charge(price, 'token');
      } catch {
        break; // the budget ran out: return what was paid for
      }
    }
    const token = i + 1 === words.length ? word : `${word} `;
    kept.push(token);
    pending.push(token);
    if (pending.length === 4) {
      emit(pending.join(''));
      pending = [];
    }
    report('generating', (i + 1) / words.length, 'writing');
  }
  if (pending.length > 0) {
    emit(pending.join(''));
  }
  const promptTokens = request.prompt.split(/\s+/).filter(Boolean).length;
  return { text: kept.join(''), usage: { promptTokens, completionTokens: kept.length } };
}
