"""ImageNet -> WebDataset shards for iTPN training (also the ``itpn-prep`` command).

``sources`` enumerates images (class folders, the nested ImageNet train tar, validation
images + labels), ``encode`` makes every image a decodable RGB JPEG, ``writer`` shuffles,
shards, resumes and verifies, ``demo`` builds the embedded demo set. See docs/data.md.
"""

from .sources import SampleRef, scan_folder, scan_imagenet_tar, scan_val
from .writer import ShardOptions, load_manifest, verify_shards, write_shards

__all__ = ["SampleRef", "scan_folder", "scan_imagenet_tar", "scan_val", "ShardOptions", "write_shards",
           "verify_shards", "load_manifest"]
