// Validates AsyncAPI documents with the official parser (@asyncapi/parser): prints each
// diagnostic of severity error, one per line, and exits 1 if a document has any.
// Usage: node asyncapi_validate.mjs FILE...
import { readFileSync } from 'node:fs';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';

const parser = new Parser();
let failed = false;
for (const file of process.argv.slice(2)) {
  const diagnostics = await parser.validate(readFileSync(file, 'utf8'), { source: file });
  for (const found of diagnostics) {
    if (found.severity !== DiagnosticSeverity.Error) continue;
    failed = true;
    console.log(`${file}: ${found.code} at /${found.path.join('/')}: ${found.message}`);
  }
}
process.exit(failed ? 1 : 0);
