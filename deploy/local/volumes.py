"""The local Kubernetes' volume provisioner: a folder in the stack folder per claim.

    python -m deploy.local.volumes --kubeconfig F --server URL --dir D --port P

Claims of the StorageClass ``standard`` (the cluster's default, provisioner
:data:`PROVISIONER`) get a PersistentVolume of type hostPath on a folder of their own
under ``D``, made writable by any user (the pods run as non-root users of their own, and
kubelet does not apply ``fsGroup`` to hostPath volumes); a released volume of reclaim
policy Delete has its folder removed and is deleted. The built-in hostPath provisioner
writes under /tmp with root-only folders, hence this one. Health: GET /healthz on P.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import shutil
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

PROVISIONER = "fleetpulse.local/hostpath"
STORAGE_CLASS = "standard"


class Provisioner:
    def __init__(self, client: httpx.Client, folder: Path) -> None:
        self.client = client
        self.folder = folder.resolve()

    def _items(self, path: str) -> list[dict[str, Any]]:
        r = self.client.get(path)
        r.raise_for_status()
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    def sync(self) -> list[str]:
        """One pass: provision pending claims, reclaim released volumes; what it did."""
        done: list[str] = []
        volumes = {pv["metadata"]["name"]: pv for pv in self._items("/api/v1/persistentvolumes")}
        for pvc in self._items("/api/v1/persistentvolumeclaims"):
            spec, meta = pvc["spec"], pvc["metadata"]
            if pvc.get("status", {}).get("phase") != "Pending" or spec.get("volumeName"):
                continue
            if spec.get("storageClassName") != STORAGE_CLASS:
                continue
            name = f"pvc-{meta['uid']}"
            if name not in volumes:
                self._provision(name, pvc)
                done.append(f"provisioned {name} for {meta['namespace']}/{meta['name']}")
        for name, pv in volumes.items():
            annotations = pv["metadata"].get("annotations", {})
            if annotations.get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
                continue
            released = pv.get("status", {}).get("phase") in ("Released", "Failed")
            if released and pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete":
                path = Path(pv["spec"]["hostPath"]["path"])
                if path.parent == self.folder:
                    shutil.rmtree(path, ignore_errors=True)
                self.client.delete(f"/api/v1/persistentvolumes/{name}").raise_for_status()
                done.append(f"deleted {name} and its folder")
        return done

    def _provision(self, name: str, pvc: dict[str, Any]) -> None:
        meta, spec = pvc["metadata"], pvc["spec"]
        path = self.folder / f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}"
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": name,
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
            },
            "spec": {
                "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                "accessModes": spec["accessModes"],
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": STORAGE_CLASS,
                "hostPath": {"path": str(path), "type": "Directory"},
                "claimRef": {
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        r = self.client.post("/api/v1/persistentvolumes", json=pv)
        if r.status_code != 409:  # made by an earlier pass
            r.raise_for_status()


def _client(kubeconfig: Path) -> httpx.Client:
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    context = ssl.create_default_context(cafile=cluster["certificate-authority"])
    context.load_cert_chain(user["client-certificate"], user["client-key"])
    return httpx.Client(base_url=cluster["server"], verify=context, timeout=10.0)


def _serve_health(port: int) -> None:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/healthz"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b"ok" if ok else b"")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.volumes")
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    provisioner = Provisioner(_client(args.kubeconfig), args.dir)
    _serve_health(args.port)
    print(f"provisioning claims of StorageClass {STORAGE_CLASS} under {args.dir}", flush=True)
    while True:
        try:
            for line in provisioner.sync():
                print(line, flush=True)
        except (httpx.HTTPError, KeyError) as exc:
            print(f"sync failed, retrying: {exc!r}", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.interval)


if __name__ == "__main__":
    raise SystemExit(main())
