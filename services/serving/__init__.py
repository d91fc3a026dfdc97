"""The Ray Serve application: deployments, HTTP API, the app builder, deploy.yaml and the serve CLI."""
