"""Where each chunk of a streaming pull comes from: the policy, in one place.

Pure code (no I/O, no clock of its own): the daemon (`tensord.fleet.pull`, `tensord.fleet.serve`)
and the simulator (`benchmarks/fleet_sim.py`) run exactly this. Change the policy here.

**Puller** (`Plan`, one per pull of one version). It keeps one request outstanding at each
source it knows, and reads what a source grants while already asking it for more:

1. Order. Chunks are wanted in a rotated order starting at `start`: the i-th of n targets of a
   fan-out starts at i * chunks / n, a lone pull at a hash of its node id. Pullers that start
   together ask the seed for different chunks first, and so have something to give each other
   at once.
2. Partial holders are asked *open* requests: "up to `batch` of the chunks I still want (a
   bitmap), whichever you hold; wait until you hold one". First those known to hold some of
   them (**partial holders ahead of the requester**), within the window, **same host first**,
   then the **fewest reads in flight**; then a few others as subscriptions (they answer when
   they have something): a request is also how the puller hears of a holder's progress.
3. A complete holder is asked only for chunks that no live partial holder is known to hold and
   that no redirect points elsewhere for, unless the chunk is *forced* (a redirect for it
   failed or stalled): so the seed is asked for what nobody else has. Among complete holders:
   **same host first**, then the **fewest reads in flight** (as each last said), then a fixed
   pseudo-random order per (puller, holder) pair; each gets different chunks.
4. A chunk a holder redirected to another node (that node is receiving it) is asked of that
   node, by name. If it has not come after `stall` seconds, or that node failed, it is forced.
5. At most `max_sources` partial holders are known at once (same-host ones and redirect targets
   come on top); a source takes a new request while what is being read from it leaves room in
   the window for another batch (so one source alone keeps several batches in flight).

**Holder** (`Book`, one per version it serves):

- It grants chunks it holds while it has free upload slots (`slots` chunks granted and not yet
  read), and remembers every grant.
- A *complete* holder (the seed) redirects a request for a chunk it already granted to another
  puller to that puller (the one it redirected to least), unless the chunk is forced: the seed
  sends each chunk about once, however many pull at once.
- A partial holder short of slots redirects named chunks the same way, else the request waits.
- A chunk a partial holder lacks waits for as long as its own pull runs (it is on its way);
  after that it is absent and the puller looks elsewhere.

    exchange  what both sides use: where a puller starts (`rotation`), `Source`, `Request`
    plan      the puller: `Plan`
    book      the holder: `Book` and its `Decision`
"""

from tensord.fleet.policy.book import Book, Decision
from tensord.fleet.policy.exchange import Request, Source, rotation, start_for, start_of
from tensord.fleet.policy.plan import Plan

__all__ = ["Book", "Decision", "Plan", "Request", "Source", "rotation", "start_for", "start_of"]
