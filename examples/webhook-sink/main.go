// Command flowpipe-sink-webhook is a flowpipe sink plugin that POSTs each batch of flow
// events to an HTTP endpoint as NDJSON. It is built only on flowpipe's public plugin SDK;
// docs/plugins.md walks through building, pinning and configuring it.
package main

import (
	"github.com/flowpipe/flowpipe/sdk"

	"github.com/flowpipe/flowpipe/examples/webhook-sink/webhook"
)

func main() {
	sdk.ServeSink(webhook.Info, webhook.Defaults, webhook.New)
}
