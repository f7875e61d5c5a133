// Sends one event of each type with the real @segment/analytics-node client, then prints, as JSON,
// exactly the messages the library put on the wire (from its own `http_request` events) and any
// errors it reported.
import { Analytics } from '@segment/analytics-node'

const host = process.env.HANDOFF_URL
const writeKey = process.env.HANDOFF_WRITE_KEY
if (!host || !writeKey) {
  console.error('HANDOFF_URL and HANDOFF_WRITE_KEY must be set')
  process.exit(2)
}

const analytics = new Analytics({ writeKey, host, flushAt: 4, maxRetries: 0 })
const sent = []
const statuses = []
const errors = []
analytics.on('http_request', (req) => sent.push(...JSON.parse(req.body).batch))
analytics.on('http_response', (res) => statuses.push(res.status))
analytics.on('error', (err) => errors.push(String(err.reason ?? err.message ?? err)))

analytics.identify({ userId: 'node-user', traits: { plan: 'pro', email_opt_in: true } })
analytics.track({
  userId: 'node-user',
  event: 'Order Completed',
  properties: { order_id: 'o-1', total: 30.5, currency: 'EUR', items: [{ sku: 'a', qty: 2 }] },
})
analytics.page({ anonymousId: 'node-anon', name: 'Pricing', properties: { path: '/pricing' } })
analytics.screen({ userId: 'node-user', name: 'Settings' })
analytics.group({ userId: 'node-user', groupId: 'acme', traits: { employees: 40 } })
analytics.alias({ userId: 'node-user', previousId: 'node-anon' })
analytics.track({ anonymousId: 'node-anon', event: 'Ünïcödé ✓', properties: { note: 'multi\nline "quoted"' } })

await analytics.closeAndFlush({ timeout: 20000 })
process.stdout.write(JSON.stringify({ sent, statuses, errors }))
