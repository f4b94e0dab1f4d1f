// Uploads one file with tus-js-client, as a web or React Native app would, and prints the upload's
// URL. Usage: node tus_upload.js ENDPOINT TOKEN FILE FILETYPE
const fs = require('fs');
const tus = require('tus-js-client');

const [endpoint, token, file, filetype] = process.argv.slice(2);
const data = fs.readFileSync(file);
const upload = new tus.Upload(data, {
  endpoint,
  headers: { Authorization: `Bearer ${token}` },
  metadata: { filename: 'upload', filetype },
  // A dropped connection is retried at once, then after a moment: each retry asks the server
  // where the upload stands (HEAD) and sends the rest.
  retryDelays: [0, 300, 1000, 3000],
  onError: (error) => {
    console.error(`upload failed: ${error}`);
    process.exit(1);
  },
  onSuccess: () => {
    console.log(JSON.stringify({ url: upload.url }));
  },
});
upload.start();
