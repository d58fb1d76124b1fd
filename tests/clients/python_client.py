"""atlassian-python-api through keygate: a paginated listing across several pages,
a tiny link's redirect followed, and a read of a restricted page through a bypass
route. Prints one JSON line; every URL the library was handed must be keygate's.

    python3 python_client.py URL READER_ID READER_SECRET SCANNER_ID SCANNER_SECRET
"""

import json
import sys

from atlassian import Confluence

url, reader_id, reader_secret, scanner_id, scanner_secret = sys.argv[1:6]
reader = Confluence(url=f"{url}/wiki", username=reader_id, password=reader_secret, cloud=True, api_version=2)
ids = [page["id"] for page in reader.get_pages(limit=1)]
redirected = reader.get(f"{url}/wiki/x/1001", absolute=True)
scanner = Confluence(url=f"{url}/wiki", username=scanner_id, password=scanner_secret, cloud=True, api_version=2)
restricted = scanner.get_page_by_id(2001)
print(json.dumps({"ids": ids, "redirected": redirected["id"], "restricted": restricted["title"]}))
