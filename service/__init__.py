"""headserve's gRPC edge: config, store, jobs, predictor, servicer, server, CLI and client."""
