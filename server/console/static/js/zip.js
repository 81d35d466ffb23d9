// A zip of a chosen folder, made in the browser: each file is streamed once through CRC-32 and
// then referenced (not copied) by the resulting Blob; entries are stored (images are compressed already).
const LIMIT = 0xffffffff; // no zip64: archives up to 4 GiB and 65,535 files

let table = null;
function crcTable() {
  if (table) return table;
  table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
}

async function crc32(file, onBytes) {
  const t = crcTable();
  let c = 0xffffffff;
  const reader = file.stream().getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    for (let i = 0; i < value.length; i++) c = t[(c ^ value[i]) & 0xff] ^ (c >>> 8);
    onBytes(value.length);
  }
  return (c ^ 0xffffffff) >>> 0;
}

function dosTime(d) {
  const time = (d.getHours() << 11) | (d.getMinutes() << 5) | (d.getSeconds() >> 1);
  const date = ((Math.max(1980, d.getFullYear()) - 1980) << 9) | ((d.getMonth() + 1) << 5) | d.getDate();
  return [time, date];
}

function header(sig, fields) {
  const size = fields.reduce((a, [n]) => a + n, 4);
  const view = new DataView(new ArrayBuffer(size));
  view.setUint32(0, sig, true);
  let o = 4;
  for (const [n, v] of fields) {
    if (n === 2) view.setUint16(o, v, true); else view.setUint32(o, v, true);
    o += n;
  }
  return new Uint8Array(view.buffer);
}

// files: [{path, file}] -> Blob (application/zip). onProgress(doneBytes, totalBytes, doneFiles).
export async function zipFolder(files, onProgress = () => {}, signal) {
  const total = files.reduce((a, f) => a + f.file.size, 0);
  if (files.length > 0xffff || total > LIMIT - files.length * 200) {
    throw new Error("the folder is too large to zip in the browser (4 GiB, 65,535 files): upload an archive instead");
  }
  const enc = new TextEncoder();
  const parts = [], central = [];
  let offset = 0, done = 0;
  for (const [i, { path, file }] of files.entries()) {
    if (signal && signal.aborted) throw new DOMException("aborted", "AbortError");
    const crc = await crc32(file, (n) => { done += n; onProgress(done, total, i); });
    const name = enc.encode(path);
    const [time, date] = dosTime(new Date(file.lastModified || Date.now()));
    const common = [[2, 20], [2, 0x0800], [2, 0], [2, time], [2, date], [4, crc], [4, file.size], [4, file.size], [2, name.length], [2, 0]];
    const local = header(0x04034b50, common);
    parts.push(local, name, file);
    central.push(header(0x02014b50, [[2, 20], ...common, [2, 0], [2, 0], [2, 0], [4, 0], [4, offset]]), name);
    offset += local.length + name.length + file.size;
  }
  const cdSize = central.reduce((a, p) => a + p.length, 0);
  const end = header(0x06054b50, [[2, 0], [2, 0], [2, files.length], [2, files.length], [4, cdSize], [4, offset], [2, 0]]);
  onProgress(total, total, files.length);
  return new Blob([...parts, ...central, end], { type: "application/zip" });
}
