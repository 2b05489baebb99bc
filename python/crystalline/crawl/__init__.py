"""The crawler: `crystalline crawl` fetches web pages politely and stores
their main text as `.txt` files under a data directory, with a SQLite
database of the frontier, so a crawl resumes after any interruption.

`page_files(data_dir)` lists the stored text files (for `train --watch`).
"""

from crystalline.crawl.crawler import CrawlConfig
from crystalline.crawl.runner import Summary, run
from crystalline.crawl.store import page_files

__all__ = ["CrawlConfig", "Summary", "page_files", "run"]
