// The REST calls the Node tests share: a purchase posted as the producer (as a shop's system
// would), and waiting until the pipeline has processed it.
//
//   const { postPurchase, waitProcessed } = pipeline({ api, adminKey, producerKey, timeout });

/** Calls against the api at `api`; `timeout` (ms) bounds each wait. */
export function pipeline({ api, adminKey, producerKey, timeout }) {
  return {
    /** POST /api/purchases; throws unless the answer is 202. */
    async postPurchase(purchaseId, amount, buyerId) {
      const r = await fetch(`${api}/api/purchases`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${producerKey}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ purchase_id: purchaseId, buyer_id: buyerId, amount }),
      });
      if (r.status !== 202) throw new Error(`POST /api/purchases ${purchaseId}: ${r.status} ${await r.text()}`);
    },
    /** Polls GET /api/purchases/{id} until it answers 200; returns the report. */
    async waitProcessed(purchaseId) {
      const deadline = Date.now() + timeout;
      while (Date.now() < deadline) {
        const r = await fetch(`${api}/api/purchases/${purchaseId}`, { headers: { Authorization: `Bearer ${adminKey}` } });
        if (r.status === 200) return r.json();
        await new Promise((res) => { setTimeout(res, 50); });
      }
      throw new Error(`purchase ${purchaseId} was not processed within ${timeout} ms`);
    },
  };
}
