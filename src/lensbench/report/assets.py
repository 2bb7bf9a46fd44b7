"""The style sheet and script of a report page, inlined into it (no network, no library)."""

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:0 1.5em 3em;color:#222}
h1{margin:.6em 0 .2em}h2{border-bottom:2px solid #ccd;padding-bottom:.2em;margin-top:2em}
code,pre{font:12px/1.4 ui-monospace,monospace;background:#f4f4f7;border-radius:3px}
pre{padding:.6em;overflow:auto;max-height:30em}code{padding:0 .25em}
.lb-row{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.lb-card{flex:1 1 420px;border:1px solid #dde;border-radius:6px;padding:.4em 1em;min-width:0}
.lb-card dl{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:.4em 0}
.lb-card dt{font-weight:600}.lb-card dd{margin:0;overflow-wrap:anywhere}
.lb-ok{color:#176b2c;font-weight:600}.lb-partial{color:#a4480a;font-weight:600}
.lb-warn{color:#8a5a00}.lb-warn li{overflow-wrap:anywhere}
figure{margin:.5em 0;flex:0 1 auto;min-width:0}figure img{max-width:100%;max-height:420px;width:auto;height:auto;border:1px solid #eee}
figcaption{font-size:12px;color:#555}
.lb-table{margin:1em 0 2em}.lb-tools{display:flex;gap:.6em;align-items:center;margin:.3em 0;flex-wrap:wrap}
.lb-tools input{padding:.2em .4em;min-width:18em}.lb-scroll{overflow:auto;max-height:70vh;border:1px solid #dde}
table{border-collapse:collapse;font-size:12px}th,td{padding:.2em .55em;border-bottom:1px solid #eee;white-space:nowrap}
th{position:sticky;top:0;background:#eef0f6;cursor:pointer;user-select:none;text-align:left}
th.lb-asc:after{content:" \\25B2"}th.lb-desc:after{content:" \\25BC"}
td.lb-num{text-align:right;font-variant-numeric:tabular-nums}td.lb-neg{color:#a11}td.lb-pos{color:#15692a}
tr:hover td{background:#f7f8fc}.lb-note{color:#555;font-size:12px}
"""

JS = r"""
(function(){
'use strict';
var PAGE=100;
function fmt(v){
  if(v===null||v===undefined)return '';
  if(typeof v==='number'){if(Number.isInteger(v))return String(v);return String(Number(v.toPrecision(6)));}
  return String(v);
}
function cmp(a,b){
  var na=a===null||a===undefined||a==='',nb=b===null||b===undefined||b==='';
  if(na||nb)return na===nb?0:(na?1:-1);
  if(typeof a==='number'&&typeof b==='number')return a-b;
  return String(a).localeCompare(String(b),undefined,{numeric:true});
}
function Table(box){
  var spec=JSON.parse(document.getElementById(box.getAttribute('data-src')).textContent);
  this.cols=spec.columns;this.all=spec.data;this.desc=spec.desc||{};this.diff=spec.diff||[];
  this.rows=this.all.slice();this.page=0;this.sortCol=-1;this.asc=true;this.box=box;
  var self=this;
  var tools=document.createElement('div');tools.className='lb-tools';
  this.filter=document.createElement('input');this.filter.type='search';
  this.filter.placeholder='filter rows (text, or column=value)';
  this.filter.addEventListener('input',function(){self.apply();});
  this.prev=document.createElement('button');this.prev.textContent='\u2190 previous';
  this.next=document.createElement('button');this.next.textContent='next \u2192';
  this.prev.addEventListener('click',function(){self.go(self.page-1);});
  this.next.addEventListener('click',function(){self.go(self.page+1);});
  this.status=document.createElement('span');this.status.className='lb-note';
  tools.appendChild(this.filter);tools.appendChild(this.prev);tools.appendChild(this.next);tools.appendChild(this.status);
  var scroll=document.createElement('div');scroll.className='lb-scroll';
  this.table=document.createElement('table');scroll.appendChild(this.table);
  var thead=this.table.createTHead(),tr=thead.insertRow();
  this.cols.forEach(function(c,i){
    var th=document.createElement('th');th.textContent=c;
    if(self.desc[c])th.title=self.desc[c];
    th.addEventListener('click',function(){self.sort(i);});tr.appendChild(th);
  });
  this.tbody=this.table.createTBody();
  box.appendChild(tools);box.appendChild(scroll);
  this.render();
}
Table.prototype.apply=function(){
  var q=this.filter.value.trim().toLowerCase(),cols=this.cols;
  if(!q){this.rows=this.all.slice();}
  else{
    var eq=q.indexOf('='),col=-1,val=q;
    if(eq>0){var name=q.slice(0,eq).trim();col=cols.map(function(c){return c.toLowerCase();}).indexOf(name);
      if(col>=0)val=q.slice(eq+1).trim();}
    this.rows=this.all.filter(function(r){
      if(col>=0)return fmt(r[col]).toLowerCase()===val;
      for(var i=0;i<r.length;i++){if(fmt(r[i]).toLowerCase().indexOf(val)>=0)return true;}return false;});
  }
  if(this.sortCol>=0)this.order();
  this.page=0;this.render();
};
Table.prototype.order=function(){
  var i=this.sortCol,s=this.asc?1:-1;
  this.rows.sort(function(a,b){return s*cmp(a[i],b[i]);});
};
Table.prototype.sort=function(i){
  this.asc=this.sortCol===i?!this.asc:true;this.sortCol=i;this.order();
  var ths=this.table.tHead.rows[0].cells;
  for(var k=0;k<ths.length;k++)ths[k].className=k===i?(this.asc?'lb-asc':'lb-desc'):'';
  this.page=0;this.render();
};
Table.prototype.go=function(p){
  var last=Math.max(0,Math.ceil(this.rows.length/PAGE)-1);this.page=Math.min(Math.max(p,0),last);this.render();
};
Table.prototype.render=function(){
  var start=this.page*PAGE,end=Math.min(start+PAGE,this.rows.length),body=document.createElement('tbody'),diff=this.diff;
  for(var r=start;r<end;r++){
    var row=this.rows[r],tr=body.insertRow();
    for(var c=0;c<row.length;c++){
      var td=tr.insertCell(),v=row[c];td.textContent=fmt(v);
      if(typeof v==='number'){td.className='lb-num'+(diff.indexOf(c)>=0&&v!==0?(v<0?' lb-neg':' lb-pos'):'');}
    }
  }
  this.table.replaceChild(body,this.tbody);this.tbody=body;
  var n=this.rows.length;
  this.status.textContent=(n?('rows '+(start+1)+'\u2013'+end+' of '+n):'no rows')+(n<this.all.length?(' (filtered from '+this.all.length+')'):'');
  this.prev.disabled=this.page===0;this.next.disabled=end>=n;
};
function init(){
  var boxes=document.querySelectorAll('.lb-table[data-src]');
  for(var i=0;i<boxes.length;i++){boxes[i].lbTable=new Table(boxes[i]);}
  document.documentElement.setAttribute('data-lb-ready',String(boxes.length));
}
if(document.readyState==='loading')document.addEventListener('DOMContentLoaded',init);else init();
})();
"""
