// The local Kubernetes' pod sandbox ("pause") program: no registry is reachable here, so
// deploy/local/node.py builds it statically and wraps it in an image FROM scratch.
module fleetpulse.local/pause

go 1.26.0
