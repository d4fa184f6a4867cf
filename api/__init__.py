"""The Flask publish API: translates HTTP to enpipeline's publish service and back."""
