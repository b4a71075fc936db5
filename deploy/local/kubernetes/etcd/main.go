// etcd for the local Kubernetes control plane: the upstream server's own main
// (etcdmain.Main), built from the Go module proxy like the other binaries.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
