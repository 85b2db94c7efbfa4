// Swagger UI for /docs: in a file of its own, not inline, so that the page's CSP allows
// scripts from this server only.
"use strict";
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  validatorUrl: null,  // the default sends the schema to validator.swagger.io
});
