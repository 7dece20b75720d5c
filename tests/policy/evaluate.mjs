// Test-only IAM policy evaluator: reads {policies, requests} as JSON on stdin, prints one decision
// per request as JSON on stdout. Decisions come from @cloud-copilot/iam-simulate (AGPL, test-only).
import { runSimulation } from '@cloud-copilot/iam-simulate'

async function readStdin() {
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return Buffer.concat(chunks).toString('utf8')
}

async function decide(policies, request) {
  const simulation = {
    request: {
      principal: request.principal,
      action: request.action,
      resource: { resource: request.resource, accountId: request.accountId },
      contextVariables: request.context ?? {},
    },
    identityPolicies: policies,
    serviceControlPolicies: [],
    resourceControlPolicies: [],
  }
  const response = await runSimulation(simulation, {})
  if (response.resultType === 'error') {
    return { decision: 'Error', errors: response.errors }
  }
  const decision = { decision: response.overallResult }
  if (response.resultType === 'single') {
    decision.ignoredContextKeys = response.result.ignoredContextKeys ?? []
  }
  return decision
}

const input = JSON.parse(await readStdin())
const results = []
for (const request of input.requests) {
  try {
    results.push(await decide(input.policies, request))
  } catch (error) {
    results.push({ decision: 'Error', errors: { message: String(error?.message ?? error) } })
  }
}
process.stdout.write(JSON.stringify({ results }) + '\n')
