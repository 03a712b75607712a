"""HTTP mode's front door: our API, OpenAI Images and AUTOMATIC1111 over one job flow."""
