"""HTTP for every domain that downloads or uploads: one client (`client.HttpClient`) on
urllib3 with a connection pool per host, proxies chosen from the environment as curl
chooses them (`proxy`), the system CA store plus an optional CA bundle, timeouts, retries
with exponential backoff that honour `Retry-After`, downloads that resume with `Range`
after a cut connection, and a byte progress bar on a terminal (`progress`). `response`
holds an answer and reads `Retry-After`; `failures` words what went wrong, as the
errors of `errors`, which name the URL, what happened and how to fix it.

Nothing here verifies content: a caller checks the digest of what it downloaded before
the bytes are used.

May import: the standard library, urllib3 and tqdm.
"""
