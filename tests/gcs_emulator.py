"""A GCS emulator for the tests (``python -m tests.gcs_emulator PORT``): ``gcp-storage-emulator`` with
one fix. Its media downloads carry no ``x-goog-generation`` header, which real GCS always sends;
TensorStore (under Orbax's OCDBT checkpoints) then holds a read without a generation and its next
conditional write fails ("Malformed StorageGeneration"). The header is added here; nothing else
changes."""

import sys

from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.server import create_server

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except Exception:  # noqa: BLE001 -- a missing object: the original handler answers 404
        pass
    return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation  # ``objects.get`` (alt=media) looks it up by name

if __name__ == "__main__":
    server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket="bkt")
    server.run()
